//! The core on an in-memory device, without FUSE.

use super::*;
use crate::device::RecordingDevice;
use crate::format::{CHUNK_SIZE, ROOT_INO};
use crate::mkfs::{MkfsOptions, format};

const MIB: u64 = 1 << 20;

fn new_media(size: u64) -> Arc<dyn Media> {
    let dev = Arc::new(RecordingDevice::new(size));
    format(dev.as_ref(), &MkfsOptions::default()).unwrap();
    dev
}

/// A device formatted with the layout of format version 2 (no space summary, a
/// single-level inode table).
fn new_media_v2(size: u64) -> Arc<dyn Media> {
    let dev = Arc::new(RecordingDevice::new(size));
    let opts = MkfsOptions {
        version_2_layout: true,
        ..MkfsOptions::default()
    };
    format(dev.as_ref(), &opts).unwrap();
    dev
}

fn mount(media: &Arc<dyn Media>) -> Fs {
    Fs::mount(Arc::clone(media), MountOptions::default()).unwrap()
}

fn check(fs: &Fs) {
    let report = crate::check::check(fs.media()).unwrap();
    assert!(
        report.problems.is_empty(),
        "consistency check: {:#?}",
        report.problems
    );
}

const C: Ctx = Ctx::ROOT;

fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        fs.read(ino, off, 1 << 20, &mut |d| out.extend_from_slice(d))
            .unwrap();
        off = out.len() as u64;
    }
    out
}

#[test]
fn create_write_read_unlink_and_remount() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"hello", 0o100644, 0).unwrap();
    assert_eq!(fs.write(&C, f.ino, 0, b"hello, pmem").unwrap(), 11);
    assert_eq!(read_all(&fs, f.ino), b"hello, pmem");
    let d = fs.mkdir(&C, ROOT_INO, b"dir", 0o755).unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    let s = fs.symlink(&C, d.ino, b"link", b"../hello").unwrap();
    assert_eq!(fs.readlink(s.ino).unwrap(), b"../hello");
    let long = vec![b'x'; 3000];
    let s2 = fs.symlink(&C, d.ino, b"long", &long).unwrap();
    assert_eq!(fs.readlink(s2.ino).unwrap(), long);
    assert!(matches!(
        fs.mknod(&C, ROOT_INO, b"hello", 0o100644, 0),
        Err(Error::Exists)
    ));
    check(&fs);
    fs.shutdown().unwrap();
    drop(fs);
    let fs = mount(&media);
    let a = fs.lookup(ROOT_INO, b"hello").unwrap();
    assert_eq!(read_all(&fs, a.ino), b"hello, pmem");
    assert_eq!(fs.lookup(d.ino, b"link").unwrap().ino, s.ino);
    fs.unlink(ROOT_INO, b"hello").unwrap();
    assert!(matches!(
        fs.lookup(ROOT_INO, b"hello"),
        Err(Error::NotFound)
    ));
    assert!(matches!(fs.rmdir(ROOT_INO, b"dir"), Err(Error::NotEmpty)));
    fs.unlink(d.ino, b"link").unwrap();
    fs.unlink(d.ino, b"long").unwrap();
    fs.rmdir(ROOT_INO, b"dir").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 2);
    check(&fs);
}

#[test]
fn big_files_get_aligned_chunks_and_read_back() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"big", 0o100644, 0).unwrap();
    let data: Vec<u8> = (0..9 * MIB + 123).map(|i| (i % 251) as u8).collect();
    for (n, chunk) in data.chunks(128 * 1024).enumerate() {
        fs.write(&C, f.ino, n as u64 * 128 * 1024, chunk).unwrap();
    }
    assert_eq!(read_all(&fs, f.ino), data);
    let i = fs.inode(f.ino).unwrap();
    let exts = extent::all(&fs.reader(), f.ino, &i).unwrap();
    let aligned: u64 = exts
        .iter()
        .filter(|e| e.file_block % 512 == 0 && e.dev_block % 512 == 0 && e.len % 512 == 0)
        .map(|e| u64::from(e.len) * 4096)
        .sum();
    assert!(
        aligned >= 4 * CHUNK_SIZE,
        "only {aligned} bytes aligned: {exts:?}"
    );
    check(&fs);
    // Truncate down and up: the tail reads as zeros.
    let mut sa = SetAttr {
        size: Some(3 * MIB + 5),
        ..Default::default()
    };
    fs.setattr(&C, f.ino, &sa).unwrap();
    sa.size = Some(4 * MIB);
    fs.setattr(&C, f.ino, &sa).unwrap();
    let back = read_all(&fs, f.ino);
    assert_eq!(
        &back[..(3 * MIB + 5) as usize],
        &data[..(3 * MIB + 5) as usize]
    );
    assert!(back[(3 * MIB + 5) as usize..].iter().all(|&b| b == 0));
    check(&fs);
}

#[test]
fn sparse_files_holes_fallocate_and_seek() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"sparse", 0o100644, 0).unwrap();
    let far = 5u64 << 30;
    fs.write(&C, f.ino, far, b"end").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, far + 3);
    let mut buf = Vec::new();
    fs.read(f.ino, far - 10, 13, &mut |d| buf.extend_from_slice(d))
        .unwrap();
    assert_eq!(&buf[..10], &[0; 10]);
    assert_eq!(&buf[10..], b"end");
    assert_eq!(fs.lseek(f.ino, 0, 3).unwrap(), (far / 4096 * 4096) as i64);
    assert_eq!(fs.lseek(f.ino, 0, 4).unwrap(), 0);
    // Preallocate, punch, zero range.
    let g = fs.mknod(&C, ROOT_INO, b"prealloc", 0o100644, 0).unwrap();
    fs.fallocate(&C, g.ino, 0, 8 * MIB, 0).unwrap();
    assert_eq!(fs.getattr(g.ino).unwrap().size, 8 * MIB);
    assert!(fs.getattr(g.ino).unwrap().blocks >= 8 * MIB / 512);
    assert!(read_all(&fs, g.ino).iter().all(|&b| b == 0));
    fs.write(&C, g.ino, MIB + 100, &[7; 10000]).unwrap();
    let back = read_all(&fs, g.ino);
    assert_eq!(
        &back[(MIB + 100) as usize..(MIB + 10100) as usize],
        &[7; 10000][..]
    );
    assert!(back[..(MIB + 100) as usize].iter().all(|&b| b == 0));
    let before = fs.statfs().bfree;
    fs.fallocate(&C, g.ino, 4 * MIB, 2 * MIB, 0x01 | 0x02)
        .unwrap();
    assert!(fs.statfs().bfree >= before + 512, "punch freed nothing");
    fs.fallocate(&C, g.ino, MIB, 8192, 0x10).unwrap();
    let back = read_all(&fs, g.ino);
    assert!(
        back[(MIB) as usize..(MIB + 8192) as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(back[(MIB + 8192) as usize], 7);
    check(&fs);
}

#[test]
fn rename_variants() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let a = fs.mkdir(&C, ROOT_INO, b"a", 0o755).unwrap();
    let b = fs.mkdir(&C, ROOT_INO, b"b", 0o755).unwrap();
    let x = fs.mknod(&C, a.ino, b"x", 0o100644, 0).unwrap();
    let y = fs.mknod(&C, b.ino, b"y", 0o100644, 0).unwrap();
    fs.rename(&Ctx::ROOT, a.ino, b"x", b.ino, b"x2", 0).unwrap();
    assert_eq!(fs.lookup(b.ino, b"x2").unwrap().ino, x.ino);
    assert!(matches!(
        fs.rename(&Ctx::ROOT, b.ino, b"x2", b.ino, b"y", RENAME_NOREPLACE),
        Err(Error::Exists)
    ));
    fs.rename(&Ctx::ROOT, b.ino, b"x2", b.ino, b"y", RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(b.ino, b"y").unwrap().ino, x.ino);
    assert_eq!(fs.lookup(b.ino, b"x2").unwrap().ino, y.ino);
    // Over an existing file: the old target loses its link.
    fs.rename(&Ctx::ROOT, b.ino, b"x2", b.ino, b"y", 0).unwrap();
    assert_eq!(fs.lookup(b.ino, b"y").unwrap().ino, y.ino);
    // Directory moves keep link counts; cycles are refused.
    let c = fs.mkdir(&C, a.ino, b"c", 0o755).unwrap();
    assert!(matches!(
        fs.rename(&Ctx::ROOT, ROOT_INO, b"a", c.ino, b"loop", 0),
        Err(Error::Invalid)
    ));
    fs.rename(&Ctx::ROOT, a.ino, b"c", b.ino, b"c", 0).unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(b.ino).unwrap().nlink, 3);
    assert_eq!(fs.lookup(c.ino, b"..").unwrap().ino, b.ino);
    // Over an empty directory, not over a full one.
    let e = fs.mkdir(&C, ROOT_INO, b"empty", 0o755).unwrap();
    fs.rename(&Ctx::ROOT, ROOT_INO, b"a", ROOT_INO, b"empty", 0)
        .unwrap();
    assert!(
        matches!(fs.getattr(e.ino), Err(Error::NotFound)) || fs.getattr(e.ino).unwrap().nlink == 0
    );
    assert!(matches!(
        fs.rename(&Ctx::ROOT, ROOT_INO, b"empty", ROOT_INO, b"b", 0),
        Err(Error::NotEmpty)
    ));
    check(&fs);
}

#[test]
fn xattrs_create_replace_list_remove() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    fs.setxattr(f.ino, b"user.a", b"1", 0).unwrap();
    assert!(matches!(
        fs.setxattr(f.ino, b"user.a", b"2", 1),
        Err(Error::Exists)
    ));
    assert!(matches!(
        fs.setxattr(f.ino, b"user.b", b"2", 2),
        Err(Error::NoAttr)
    ));
    fs.setxattr(f.ino, b"user.a", b"22", 2).unwrap();
    let big = vec![9u8; 65536];
    fs.setxattr(f.ino, b"trusted.big", &big, 0).unwrap();
    assert_eq!(fs.getxattr(f.ino, b"user.a").unwrap(), b"22");
    assert_eq!(fs.getxattr(f.ino, b"trusted.big").unwrap(), big);
    assert_eq!(fs.listxattr(f.ino).unwrap(), b"user.a\0trusted.big\0");
    assert!(matches!(
        fs.setxattr(f.ino, b"bogus.x", b"", 0),
        Err(Error::NotSupported)
    ));
    fs.removexattr(f.ino, b"user.a").unwrap();
    assert!(matches!(fs.getxattr(f.ino, b"user.a"), Err(Error::NoAttr)));
    check(&fs);
}

#[test]
fn unlinked_open_file_keeps_data_until_release_and_orphans_are_freed_at_mount() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let free0 = fs.statfs().bfree;
    let f = fs.mknod(&C, ROOT_INO, b"tmp", 0o100644, 0).unwrap();
    fs.open(f.ino, libc::O_RDWR).unwrap();
    fs.write(&C, f.ino, 0, &vec![1u8; 3 * MIB as usize])
        .unwrap();
    fs.unlink(ROOT_INO, b"tmp").unwrap();
    assert_eq!(read_all(&fs, f.ino).len(), 3 * MIB as usize);
    assert_eq!(fs.orphans().unwrap(), vec![f.ino]);
    fs.release(f.ino);
    fs.forget(f.ino, 1);
    assert!(fs.orphans().unwrap().is_empty());
    assert_eq!(fs.statfs().bfree, free0);
    check(&fs);
    // A "crash" while an unlinked file is open: the next mount frees it.
    let g = fs.mknod(&C, ROOT_INO, b"tmp2", 0o100644, 0).unwrap();
    fs.open(g.ino, libc::O_RDWR).unwrap();
    fs.write(&C, g.ino, 0, &[2u8; 10000]).unwrap();
    fs.unlink(ROOT_INO, b"tmp2").unwrap();
    drop(fs);
    let fs = mount(&media);
    assert!(fs.orphans().unwrap().is_empty());
    assert_eq!(fs.statfs().bfree, free0);
    check(&fs);
}

#[test]
fn enospc_harms_nothing_and_space_comes_back() {
    let media = new_media(32 * MIB);
    let fs = mount(&media);
    let keep = fs.mknod(&C, ROOT_INO, b"keep", 0o100644, 0).unwrap();
    fs.write(&C, keep.ino, 0, b"precious").unwrap();
    let mut n = 0;
    let err = loop {
        let name = format!("f{n}");
        let f = fs
            .mknod(&C, ROOT_INO, name.as_bytes(), 0o100644, 0)
            .unwrap();
        match fs.write(&C, f.ino, 0, &vec![3u8; MIB as usize]) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 100, "never ran out of space");
    };
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(read_all(&fs, keep.ino), b"precious");
    check(&fs);
    for k in 0..=n {
        fs.unlink(ROOT_INO, format!("f{k}").as_bytes()).unwrap();
    }
    let f = fs.mknod(&C, ROOT_INO, b"again", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, &vec![4u8; 4 * MIB as usize])
        .unwrap();
    check(&fs);
}

#[test]
fn readdir_cookies_survive_concurrent_changes() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let d = fs.mkdir(&C, ROOT_INO, b"d", 0o755).unwrap();
    for i in 0..2000 {
        fs.mknod(&C, d.ino, format!("file-{i}").as_bytes(), 0o100644, 0)
            .unwrap();
    }
    // Read in small batches; between batches, delete entries not yet seen and add new ones.
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0i64;
    let mut round = 0;
    loop {
        let mut batch = Vec::new();
        fs.readdir(d.ino, offset, &mut |_, next, _, name| {
            batch.push((next, name.to_vec()));
            batch.len() >= 50
        })
        .unwrap();
        if batch.is_empty() {
            break;
        }
        for (next, name) in &batch {
            assert!(
                seen.insert(name.clone()),
                "{} returned twice",
                String::from_utf8_lossy(name)
            );
            offset = *next;
        }
        fs.mknod(&C, d.ino, format!("new-{round}").as_bytes(), 0o100644, 0)
            .unwrap();
        round += 1;
    }
    for i in 0..2000 {
        assert!(
            seen.contains(format!("file-{i}").as_bytes()),
            "file-{i} skipped"
        );
    }
    assert_eq!(fs.getattr(d.ino).unwrap().size, 2000 + round);
    check(&fs);
}

#[test]
fn concurrent_threads_in_one_directory() {
    let media = new_media(128 * MIB);
    let fs = mount(&media);
    let d = fs.mkdir(&C, ROOT_INO, b"shared", 0o755).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let fs = &fs;
            s.spawn(move || {
                for i in 0..150u64 {
                    let name = format!("t{t}-{i}");
                    let f = fs.mknod(&C, d.ino, name.as_bytes(), 0o100644, 0).unwrap();
                    fs.write(&C, f.ino, 0, &vec![t as u8; (i as usize % 7) * 3000 + 1])
                        .unwrap();
                    if i % 3 == 0 {
                        fs.rename(
                            &Ctx::ROOT,
                            d.ino,
                            name.as_bytes(),
                            d.ino,
                            format!("r{t}-{i}").as_bytes(),
                            0,
                        )
                        .unwrap();
                    }
                    if i % 5 == 0 {
                        let victim = if i % 3 == 0 {
                            format!("r{t}-{i}")
                        } else {
                            name
                        };
                        fs.unlink(d.ino, victim.as_bytes()).unwrap();
                    }
                }
            });
        }
    });
    let mut count = 0;
    fs.readdir(d.ino, 2, &mut |_, _, _, _| {
        count += 1;
        false
    })
    .unwrap();
    assert_eq!(count, 4 * (150 - 30));
    check(&fs);
}

#[test]
fn leases_defer_frees_until_they_end_and_mount_frees_leftovers() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"mapped", 0o100644, 0).unwrap();
    fs.setattr(
        &C,
        f.ino,
        &SetAttr {
            size: Some(6 * MIB),
            ..Default::default()
        },
    )
    .unwrap();
    let (lease, exts) = fs.map_direct(f.ino, 0, 6 * MIB).unwrap();
    // Holes were allocated and zeroed: the whole range is mapped.
    assert_eq!(exts.iter().map(|e| e.len).sum::<u64>(), 6 * MIB);
    assert!(exts.iter().all(|e| !e.unwritten));
    let mapped: Vec<(u64, u64)> = exts
        .iter()
        .map(|e| (e.device_offset, e.device_offset + e.len))
        .collect();
    let free_before = fs.statfs().bfree;
    // Truncate while mapped: nothing is freed for reuse.
    fs.setattr(
        &C,
        f.ino,
        &SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(fs.statfs().bfree, free_before);
    let g = fs.mknod(&C, ROOT_INO, b"other", 0o100644, 0).unwrap();
    fs.write(&C, g.ino, 0, &vec![9u8; 8 * MIB as usize])
        .unwrap();
    for e in fs.layout(g.ino).unwrap() {
        for &(s, t) in &mapped {
            assert!(
                e.device_offset + e.len <= s || e.device_offset >= t,
                "mapped blocks reused"
            );
        }
    }
    check(&fs);
    fs.end_lease(lease).unwrap();
    assert_eq!(fs.lease_count(), 0);
    assert_eq!(
        fs.statfs().bfree,
        free_before - 8 * MIB / 4096 + 6 * MIB / 4096
    );
    check(&fs);
    // Deferred frees left by a crash are completed at mount.
    let (_lease, _) = fs.map_direct(g.ino, 0, 8 * MIB).unwrap();
    fs.unlink(ROOT_INO, b"other").unwrap();
    fs.forget(g.ino, 1);
    drop(fs);
    let fs = mount(&media);
    // The truncated file's 6 MiB were freed at lease end, the unlinked 8 MiB at mount.
    assert_eq!(fs.statfs().bfree, free_before + 6 * MIB / 4096);
    check(&fs);
}

/// Regression (found through the mount): a directory broke at its 441st entry.
#[test]
fn thousands_of_long_names_in_one_directory() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let d = fs.mkdir(&C, ROOT_INO, b"d", 0o755).unwrap();
    for i in 0..3000 {
        let name = format!("entry-with-a-longish-name-{i:05}");
        assert!(matches!(
            fs.lookup(d.ino, name.as_bytes()),
            Err(Error::NotFound)
        ));
        fs.mknod(&C, d.ino, name.as_bytes(), 0o100644, 0).unwrap();
    }
    for i in (0..3000).step_by(7) {
        let name = format!("entry-with-a-longish-name-{i:05}");
        fs.lookup(d.ino, name.as_bytes()).unwrap();
    }
    check(&fs);
}

#[test]
fn map_direct_of_a_large_sparse_file() {
    let media = new_media(2048 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"big", 0o100644, 0).unwrap();
    fs.setattr(
        &C,
        f.ino,
        &SetAttr {
            size: Some(1024 * MIB),
            ..Default::default()
        },
    )
    .unwrap();
    let (_, exts) = fs.map_direct(f.ino, 0, 1024 * MIB).unwrap();
    assert_eq!(exts.iter().map(|e| e.len).sum::<u64>(), 1024 * MIB);
    assert!(
        exts.iter()
            .all(|e| e.file_offset % CHUNK_SIZE == 0 && e.device_offset % CHUNK_SIZE == 0)
    );
    check(&fs);
}

/// Regression (xfstests generic/286): unlinking a file with more extents than one journal
/// slot can free failed with EFBIG and left the file in place.
#[test]
fn unlink_of_a_file_with_many_extents_succeeds_and_frees_everything() {
    let media = new_media(256 * MIB);
    let fs = mount(&media);
    let free0 = fs.statfs().bfree;
    let f = fs.mknod(&C, ROOT_INO, b"frag", 0o100644, 0).unwrap();
    // 96 MiB, then a hole punched in every other 4 KiB block: one extent each.
    let chunk = vec![1u8; MIB as usize];
    for k in 0..96u64 {
        fs.write(&C, f.ino, k * MIB, &chunk).unwrap();
    }
    for k in 0..12_000u64 {
        fs.fallocate(&C, f.ino, k * 8192 + 4096, 4096, 0x01 | 0x02)
            .unwrap();
    }
    assert!(
        extent::all(&fs.reader(), f.ino, &fs.inode(f.ino).unwrap())
            .unwrap()
            .len()
            >= 12_000
    );
    fs.unlink(ROOT_INO, b"frag").unwrap();
    fs.forget(f.ino, 1);
    assert!(matches!(fs.lookup(ROOT_INO, b"frag"), Err(Error::NotFound)));
    assert_eq!(fs.statfs().bfree, free0);
    assert!(fs.orphans().unwrap().is_empty());
    check(&fs);
}

/// Regression (xfstests generic/013, fsstress): scattered small writes far into a sparse
/// file took a whole 2 MiB chunk each and filled the device.
#[test]
fn scattered_small_writes_in_a_sparse_file_take_small_blocks() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let free0 = fs.statfs().bfree;
    let f = fs.mknod(&C, ROOT_INO, b"sparse", 0o100644, 0).unwrap();
    for k in 0..200u64 {
        let off = (k * 7919 % 1000) * 3 * MIB + 12345;
        if let Err(e) = fs.write(&C, f.ino, off, &[5u8; 4096]) {
            panic!(
                "write {k} at {off}: {e}; used {} blocks",
                free0 - fs.statfs().bfree
            );
        }
    }
    let used = free0 - fs.statfs().bfree;
    assert!(used < 2000, "{used} blocks for 200 scattered 4 KiB writes");
    // Appending still grows in aligned chunks.
    let g = fs.mknod(&C, ROOT_INO, b"append", 0o100644, 0).unwrap();
    for k in 0..48u64 {
        fs.write(&C, g.ino, k * 128 * 1024, &[6u8; 128 * 1024])
            .unwrap();
    }
    let exts = fs.layout(g.ino).unwrap();
    assert!(
        exts.iter()
            .all(|e| e.file_offset % CHUNK_SIZE == 0 && e.device_offset % CHUNK_SIZE == 0),
        "{exts:?}"
    );
    check(&fs);
}

/// Regressions from xfstests: file handles are resolved by looking up "." in the inode
/// itself, whatever its type (generic/426 and others); SEEK_DATA/SEEK_HOLE at a negative
/// offset is ENXIO (generic/448).
#[test]
fn lookup_dot_in_a_file_and_lseek_at_negative_offsets() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, b"data").unwrap();
    let a = fs.lookup(f.ino, b".").unwrap();
    assert_eq!((a.ino, a.generation), (f.ino, f.generation));
    assert_eq!(fs.lseek(f.ino, -1, 3).unwrap_err().errno(), libc::ENXIO);
    assert_eq!(fs.lseek(f.ino, -1, 4).unwrap_err().errno(), libc::ENXIO);
}

/// Regression from xfstests (generic/355, 683-685): a write or fallocate by an unprivileged
/// caller clears set-user-ID, and set-group-ID when the group may execute or the caller is
/// not in the file's group; root keeps them.
#[test]
fn unprivileged_data_changes_clear_setid_bits() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let user = Ctx {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o106666, 0).unwrap();
    fs.write(&C, f.ino, 0, b"root keeps the bits").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().mode & 0o7777, 0o6666);
    fs.write(&user, f.ino, 0, b"x").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().mode & 0o7777, 0o666);
    fs.setattr(
        &C,
        f.ino,
        &SetAttr {
            mode: Some(0o6676),
            ..Default::default()
        },
    )
    .unwrap();
    fs.fallocate(&user, f.ino, 0, 4096, 0x01).unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().mode & 0o7777, 0o676);
    // In the file's group, without group execute: set-group-ID stays.
    fs.setattr(
        &C,
        f.ino,
        &SetAttr {
            mode: Some(0o6666),
            gid: Some(1000),
            ..Default::default()
        },
    )
    .unwrap();
    fs.fallocate(&user, f.ino, 0, 8192, 0x01 | 0x02).unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().mode & 0o7777, 0o2666);
}

/// Under FUSE_HANDLE_KILLPRIV_V2 the kernel sends truncate and chown without a mode and
/// leaves set-ID clearing to the daemon: truncate by an unprivileged caller clears as a
/// write does; chown of a non-directory clears set-user-ID always (named owner unchanged or
/// not), set-group-ID when group-executable or the caller is outside the file's group; an
/// explicit mode in the same request wins; directories keep their bits.
#[test]
fn truncate_and_chown_clear_setid_bits_as_the_kernel_would() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let user = Ctx {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    let mode = |ino| fs.getattr(ino).unwrap().mode & 0o7777;
    let set = |ctx: &Ctx, ino, s: SetAttr| fs.setattr(ctx, ino, &s).unwrap();
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o106666, 0).unwrap().ino;
    set(
        &C,
        f,
        SetAttr {
            size: Some(10),
            ..Default::default()
        },
    );
    assert_eq!(mode(f), 0o6666, "root's truncate keeps the bits");
    set(
        &user,
        f,
        SetAttr {
            size: Some(0),
            ..Default::default()
        },
    );
    assert_eq!(mode(f), 0o666, "an unprivileged truncate clears both");

    set(
        &C,
        f,
        SetAttr {
            mode: Some(0o6666),
            ..Default::default()
        },
    );
    set(
        &C,
        f,
        SetAttr {
            uid: Some(0),
            ..Default::default()
        },
    );
    assert_eq!(
        mode(f),
        0o2666,
        "chown to the same owner clears set-user-ID"
    );
    set(
        &C,
        f,
        SetAttr {
            mode: Some(0o6676),
            ..Default::default()
        },
    );
    set(
        &C,
        f,
        SetAttr {
            gid: Some(1000),
            ..Default::default()
        },
    );
    assert_eq!(mode(f), 0o676, "group-executable: set-group-ID goes too");
    set(
        &C,
        f,
        SetAttr {
            mode: Some(0o6666),
            uid: Some(1000),
            ..Default::default()
        },
    );
    assert_eq!(mode(f), 0o6666, "an explicit mode wins");
    set(
        &C,
        f,
        SetAttr {
            gid: Some(2000),
            ..Default::default()
        },
    );
    set(
        &C,
        f,
        SetAttr {
            mode: Some(0o2666),
            ..Default::default()
        },
    );
    set(
        &user,
        f,
        SetAttr {
            gid: Some(2000),
            ..Default::default()
        },
    );
    assert_eq!(
        mode(f),
        0o666,
        "a caller outside the file's group loses set-group-ID"
    );

    let d = fs.mkdir(&C, ROOT_INO, b"d", 0o2775).unwrap().ino;
    set(
        &C,
        d,
        SetAttr {
            uid: Some(1000),
            ..Default::default()
        },
    );
    assert_eq!(mode(d), 0o2775, "directories keep set-group-ID");
}

/// A file of 20,000 one-block extents (2 blocks apart), on its own 256 MiB device.
fn fragmented_file(extents: u64) -> (Arc<dyn Media>, Fs, u64, u64) {
    let media = new_media(256 * MIB);
    let fs = mount(&media);
    let free0 = fs.statfs().bfree;
    let f = fs.mknod(&C, ROOT_INO, b"frag", 0o100644, 0).unwrap();
    let chunk = vec![1u8; MIB as usize];
    for k in 0..(extents * 8192).div_ceil(MIB) {
        fs.write(&C, f.ino, k * MIB, &chunk).unwrap();
    }
    for k in 0..extents {
        fs.fallocate(&C, f.ino, k * 8192 + 4096, 4096, 0x01 | 0x02)
            .unwrap();
    }
    let n = extent::all(&fs.reader(), f.ino, &fs.inode(f.ino).unwrap())
        .unwrap()
        .len() as u64;
    assert!(n >= extents, "{n} extents");
    (media, fs, f.ino, free0)
}

/// Issue 13 item 3 (xfstests generic/610): punch hole, zero range and truncate of a file of
/// 20,000 extents, leased or not, each in one call; then the lease ends, the device is
/// remounted, and every block comes back.
#[test]
fn punch_zero_and_truncate_of_a_20000_extent_file_succeed_leased_or_not() {
    const EXTENTS: u64 = 20_000;
    for leased in [false, true] {
        let (media, fs, ino, free0) = fragmented_file(EXTENTS);
        let lease = leased.then(|| fs.map_direct(ino, 0, EXTENTS * 8192).unwrap().0);
        let third = EXTENTS * 8192 / 3;
        let size = fs.getattr(ino).unwrap().size;
        // PUNCH_HOLE | KEEP_SIZE over the first third, ZERO_RANGE over the second.
        fs.fallocate(&C, ino, 0, third, 0x01 | 0x02)
            .unwrap_or_else(|e| panic!("leased={leased}: punch: {e}"));
        fs.fallocate(&C, ino, third, third, 0x10)
            .unwrap_or_else(|e| panic!("leased={leased}: zero range: {e}"));
        let mut head = Vec::new();
        fs.read(ino, third - 8192, 16384, &mut |d| head.extend_from_slice(d))
            .unwrap();
        assert!(
            head.iter().all(|&b| b == 0),
            "leased={leased}: punched bytes"
        );
        assert_eq!(
            fs.getattr(ino).unwrap().size,
            size,
            "KEEP_SIZE and ZERO_RANGE in the file"
        );
        // And truncate the rest away in one call.
        let t = SetAttr {
            size: Some(4096),
            ..SetAttr::default()
        };
        fs.setattr(&C, ino, &t)
            .unwrap_or_else(|e| panic!("leased={leased}: truncate: {e}"));
        assert_eq!(fs.getattr(ino).unwrap().size, 4096);
        if let Some(id) = lease {
            // Every deferred block is freed, in steps, when the lease ends.
            fs.end_lease(id).unwrap();
        }
        check(&fs);
        fs.unlink(ROOT_INO, b"frag").unwrap();
        fs.forget(ino, 1);
        assert_eq!(fs.statfs().bfree, free0, "leased={leased}: space came back");
        fs.shutdown().unwrap();
        drop(fs);
        let fs = mount(&media);
        assert_eq!(fs.statfs().bfree, free0);
        check(&fs);
    }
}

/// A leased fragmented file truncated, and the daemon gone before the lease ended: the
/// next mount frees the 20,000 deferred ranges (in steps) and mounts read-write.
#[test]
fn mount_frees_20000_deferred_ranges_left_by_a_lease() {
    let (media, fs, ino, free0) = fragmented_file(20_000);
    fs.map_direct(ino, 0, 20_000 * 8192).unwrap();
    let t = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    fs.setattr(&C, ino, &t).unwrap();
    drop(fs); // no unmount, no lease end: as after kill -9
    let fs = mount(&media);
    assert!(!fs.is_read_only());
    fs.unlink(ROOT_INO, b"frag").unwrap();
    fs.forget(ino, 1);
    assert_eq!(fs.statfs().bfree, free0);
    check(&fs);
}

/// Removes everything below `dir` (files first, then the directories, deepest first), as
/// `rm -rf` through the kernel does: each name is looked up (a kernel reference) before it
/// is removed, and forgotten after. Panics on the first failure.
fn remove_tree(fs: &Fs, dir: u64) {
    let list = |d: u64| {
        let mut names = Vec::new();
        fs.readdir(d, 2, &mut |ino, _, kind, name| {
            names.push((ino, kind, name.to_vec()));
            false
        })
        .unwrap();
        names
    };
    // Every directory below `dir` with its parent and name, parents before children.
    let mut dirs: Vec<(u64, u64, Vec<u8>)> = Vec::new();
    let mut todo = vec![dir];
    while let Some(d) = todo.pop() {
        for (ino, kind, name) in list(d) {
            if kind == crate::format::file_type::S_IFDIR {
                dirs.push((ino, d, name));
                todo.push(ino);
            }
        }
    }
    let remove = |parent: u64, name: &[u8], ino: u64, is_dir: bool| {
        assert_eq!(fs.lookup(parent, name).unwrap().ino, ino);
        let r = if is_dir {
            fs.rmdir(parent, name)
        } else {
            fs.unlink(parent, name)
        };
        r.unwrap_or_else(|e| panic!("removing {}: {e}", String::from_utf8_lossy(name)));
        fs.forget(ino, 2); // the create's reference and the lookup's
    };
    for d in dirs.iter().map(|(ino, _, _)| *ino).chain([dir]) {
        for (ino, kind, name) in list(d) {
            if kind != crate::format::file_type::S_IFDIR {
                remove(d, &name, ino, false);
            }
        }
    }
    for (ino, parent, name) in dirs.iter().rev() {
        remove(*parent, name, *ino, true);
    }
}

/// Issue 13 item 4: a full file system can always be emptied. Fills a device until ENOSPC
/// in several patterns (every create's reference kept, as the kernel keeps them), then
/// removes everything: every unlink and rmdir succeeds, the free space and inodes return to
/// what a fresh file system has, and the checker is clean.
#[test]
fn a_full_file_system_can_always_be_emptied() {
    type Fill = fn(&Fs, u64);
    fn small_files(fs: &Fs, dir: u64) {
        for i in 0.. {
            match fs.mknod(&C, dir, format!("small-{i}").as_bytes(), 0o100644, 0) {
                Ok(a) => {
                    if fs.write(&C, a.ino, 0, &[3u8; 5000]).is_err() {
                        break;
                    }
                }
                Err(Error::NoSpace | Error::NoInodes) => break,
                Err(e) => panic!("create: {e}"),
            }
        }
    }
    let big_then_small: Fill = |fs, dir| {
        let a = fs.mknod(&C, dir, b"big", 0o100644, 0).unwrap();
        let chunk = vec![7u8; MIB as usize];
        let mut off = 0;
        while fs.write(&C, a.ino, off, &chunk).is_ok() {
            off += MIB;
        }
        small_files(fs, dir);
    };
    let xattrs: Fill = |fs, dir| {
        for i in 0.. {
            let Ok(a) = fs.mknod(&C, dir, format!("x-{i}").as_bytes(), 0o100644, 0) else {
                break;
            };
            if fs.setxattr(a.ino, b"user.big", &[9u8; 30_000], 0).is_err() {
                break;
            }
        }
    };
    let deep_dirs: Fill = |fs, dir| {
        let mut parent = dir;
        for i in 0.. {
            match fs.mkdir(&C, parent, format!("level-{i}").as_bytes(), 0o755) {
                Ok(a) => {
                    for j in 0..20 {
                        if fs
                            .mknod(&C, a.ino, format!("f{j}").as_bytes(), 0o100644, 0)
                            .is_err()
                        {
                            return;
                        }
                    }
                    parent = a.ino;
                }
                Err(_) => return,
            }
        }
    };
    for (name, fill) in [
        ("small files", small_files as Fill),
        ("a big file, then small files", big_then_small),
        ("xattrs", xattrs),
        ("deep directories", deep_dirs),
    ] {
        let media = new_media(64 * MIB);
        let fs = mount(&media);
        let fresh = fs.statfs();
        let d = fs.mkdir(&C, ROOT_INO, b"fill", 0o755).unwrap();
        fill(&fs, d.ino);
        assert!(
            fs.statfs().bfree < fresh.bfree / 50,
            "{name}: the device did not fill"
        );
        remove_tree(&fs, d.ino);
        fs.rmdir(ROOT_INO, b"fill").unwrap();
        fs.forget(d.ino, 1);
        let after = fs.statfs();
        eprintln!(
            "{name}: free blocks {} of {} fresh, inodes in use {} ({} fresh)",
            after.bfree,
            fresh.bfree,
            after.files - after.ffree,
            fresh.files - fresh.ffree
        );
        assert!(
            after.bfree + fresh.blocks / 100 >= fresh.bfree,
            "{name}: {} of {} free blocks came back",
            after.bfree,
            fresh.bfree
        );
        assert_eq!(
            after.files - after.ffree,
            fresh.files - fresh.ffree,
            "{name}: inodes in use"
        );
        assert_eq!(
            fs.inode_table().chunk_blocks().len(),
            1,
            "{name}: the table shrank"
        );
        check(&fs);
        fs.shutdown().unwrap();
    }
}

/// "." and ".." are never stored: the core refuses them as new names, so every entry it
/// writes passes the strict entry decoder that the checker and the repair share
/// (`format::dirent`). Before, `mknod(parent, "..")` stored an entry named "..", which
/// readdir listed next to the real one and fsck's repair dropped.
#[test]
fn dot_names_are_never_stored() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    for name in [&b"."[..], b".."] {
        assert!(matches!(
            fs.mknod(&C, ROOT_INO, name, 0o100644, 0),
            Err(Error::Invalid)
        ));
        assert!(matches!(
            fs.mkdir(&C, ROOT_INO, name, 0o755),
            Err(Error::Invalid)
        ));
        assert!(matches!(
            fs.link(f.ino, ROOT_INO, name),
            Err(Error::Invalid)
        ));
        assert!(matches!(
            fs.rename(&Ctx::ROOT, ROOT_INO, b"f", ROOT_INO, name, 0),
            Err(Error::Invalid)
        ));
    }
    let mut names = Vec::new();
    fs.readdir(ROOT_INO, 0, &mut |_, _, _, n| {
        names.push(n.to_vec());
        false
    })
    .unwrap();
    assert_eq!(names, [&b"."[..], b"..", b"f"]);
    check(&fs);
}

/// An unprivileged caller owning what it creates.
const USER: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
    pid: 0,
};

fn eperm<T: std::fmt::Debug>(what: &str, r: Result<T>) {
    assert!(
        matches!(r, Err(Error::NotPermitted)),
        "{what}: expected EPERM, got {r:?}"
    );
}

fn set_mode(mode: u32) -> SetAttr {
    SetAttr {
        mode: Some(mode),
        ..SetAttr::default()
    }
}

#[test]
fn an_immutable_inode_refuses_every_change_until_root_clears_the_flag() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let d = fs.mkdir(&C, ROOT_INO, b"d", 0o777).unwrap();
    let f = fs.mknod(&USER, d.ino, b"f", 0o100644, 0).unwrap();
    fs.write(&USER, f.ino, 0, b"kept").unwrap();
    let other = fs.mknod(&USER, d.ino, b"other", 0o100644, 0).unwrap();
    fs.setxattr(f.ino, b"user.x", b"1", 0).unwrap();
    // Only root may set immutable, even on the owner's file; others may not touch flags.
    eperm(
        "owner sets +i",
        fs.set_attr_flags(&USER, f.ino, inode_flags::IMMUTABLE),
    );
    let stranger = Ctx { uid: 1001, ..USER };
    eperm(
        "stranger sets +d",
        fs.set_attr_flags(&stranger, f.ino, inode_flags::NODUMP),
    );
    fs.set_attr_flags(&C, f.ino, inode_flags::IMMUTABLE)
        .unwrap();
    assert_eq!(fs.attr_flags(f.ino).unwrap(), inode_flags::IMMUTABLE);

    eperm("write", fs.write(&C, f.ino, 0, b"x"));
    eperm("write at EOF", fs.write(&C, f.ino, 4, b"x"));
    let truncate = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    eperm("truncate", fs.setattr(&C, f.ino, &truncate));
    eperm("chmod", fs.setattr(&C, f.ino, &set_mode(0o600)));
    let chown = SetAttr {
        uid: Some(0),
        ..SetAttr::default()
    };
    eperm("chown", fs.setattr(&C, f.ino, &chown));
    let touch = SetAttr {
        atime: Some(SetTime::Now),
        mtime: Some(SetTime::Now),
        ..SetAttr::default()
    };
    eperm("touch", fs.setattr(&C, f.ino, &touch));
    eperm("fallocate", fs.fallocate(&C, f.ino, 0, 4096, 0));
    eperm("open for writing", fs.open(f.ino, libc::O_WRONLY));
    eperm(
        "open with O_TRUNC",
        fs.open(f.ino, libc::O_RDONLY | libc::O_TRUNC),
    );
    eperm("unlink", fs.unlink(d.ino, b"f"));
    eperm("rename", fs.rename(&C, d.ino, b"f", d.ino, b"g", 0));
    eperm(
        "rename over it",
        fs.rename(&C, d.ino, b"other", d.ino, b"f", 0),
    );
    eperm(
        "exchange",
        fs.rename(&C, d.ino, b"other", d.ino, b"f", RENAME_EXCHANGE),
    );
    eperm("link", fs.link(f.ino, d.ino, b"f2"));
    eperm("setxattr", fs.setxattr(f.ino, b"user.y", b"2", 0));
    eperm("removexattr", fs.removexattr(f.ino, b"user.x"));
    // Reading is fine, and so is a read-only open.
    fs.open(f.ino, libc::O_RDONLY).unwrap();
    fs.release(f.ino);
    assert_eq!(read_all(&fs, f.ino), b"kept");
    assert_eq!(fs.getxattr(f.ino, b"user.x").unwrap(), b"1");

    // An immutable directory: no entry added or removed, even a non-empty one's (EPERM
    // before ENOTEMPTY, as the VFS checks).
    let sub = fs.mkdir(&C, d.ino, b"sub", 0o755).unwrap();
    fs.mknod(&C, sub.ino, b"inner", 0o100644, 0).unwrap();
    fs.set_attr_flags(&C, d.ino, inode_flags::IMMUTABLE)
        .unwrap();
    eperm("create in it", fs.mknod(&C, d.ino, b"new", 0o100644, 0));
    eperm("mkdir in it", fs.mkdir(&C, d.ino, b"newdir", 0o755));
    eperm("symlink in it", fs.symlink(&C, d.ino, b"ln", b"f"));
    eperm("unlink in it", fs.unlink(d.ino, b"other"));
    eperm("rmdir of a full subdirectory", fs.rmdir(d.ino, b"sub"));
    eperm(
        "rename into it",
        fs.rename(&C, sub.ino, b"inner", d.ino, b"x", 0),
    );
    eperm(
        "rename out of it",
        fs.rename(&C, d.ino, b"other", ROOT_INO, b"x", 0),
    );
    eperm("link into it", fs.link(other.ino, d.ino, b"o2"));
    // Entries of its subdirectories are the subdirectories' own.
    fs.mknod(&C, sub.ino, b"deeper", 0o100644, 0).unwrap();

    // Root lifts both flags, and everything works again (and the flags persist meanwhile).
    drop(fs);
    let fs = mount(&media);
    assert_eq!(fs.attr_flags(d.ino).unwrap(), inode_flags::IMMUTABLE);
    eperm("owner clears -i", fs.set_attr_flags(&USER, f.ino, 0));
    fs.set_attr_flags(&C, d.ino, 0).unwrap();
    fs.set_attr_flags(&C, f.ino, 0).unwrap();
    fs.write(&USER, f.ino, 4, b"+more").unwrap();
    fs.rename(&C, d.ino, b"other", d.ino, b"f", 0).unwrap();
    assert_eq!(fs.lookup(d.ino, b"f").unwrap().ino, other.ino);
    check(&fs);
}

#[test]
fn an_append_only_file_takes_writes_at_its_end_only() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&USER, ROOT_INO, b"log", 0o100666, 0).unwrap();
    fs.write(&USER, f.ino, 0, b"one\n").unwrap();
    fs.set_attr_flags(&C, f.ino, inode_flags::APPEND).unwrap();
    fs.write(&USER, f.ino, 4, b"two\n").unwrap();
    eperm("overwrite", fs.write(&USER, f.ino, 0, b"ONE"));
    eperm("write past EOF", fs.write(&USER, f.ino, 100, b"x"));
    assert_eq!(read_all(&fs, f.ino), b"one\ntwo\n");
    eperm("open O_WRONLY", fs.open(f.ino, libc::O_WRONLY));
    eperm("open O_RDWR", fs.open(f.ino, libc::O_RDWR));
    eperm(
        "open O_APPEND|O_TRUNC",
        fs.open(f.ino, libc::O_WRONLY | libc::O_APPEND | libc::O_TRUNC),
    );
    fs.open(f.ino, libc::O_WRONLY | libc::O_APPEND).unwrap();
    fs.release(f.ino);
    let truncate = SetAttr {
        size: Some(4),
        ..SetAttr::default()
    };
    eperm("truncate", fs.setattr(&C, f.ino, &truncate));
    eperm("chmod", fs.setattr(&C, f.ino, &set_mode(0o600)));
    let set_times = SetAttr {
        mtime: Some(SetTime::At(1)),
        ..SetAttr::default()
    };
    eperm("utimes to a given time", fs.setattr(&C, f.ino, &set_times));
    let touch = SetAttr {
        atime: Some(SetTime::Now),
        mtime: Some(SetTime::Now),
        ..SetAttr::default()
    };
    fs.setattr(&C, f.ino, &touch).unwrap();
    // Preallocation changes no byte; punching does.
    fs.fallocate(&C, f.ino, 0, 1 << 20, libc::FALLOC_FL_KEEP_SIZE)
        .unwrap();
    eperm(
        "punch",
        fs.fallocate(
            &C,
            f.ino,
            0,
            4096,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        ),
    );
    eperm("unlink", fs.unlink(ROOT_INO, b"log"));
    eperm("setxattr", fs.setxattr(f.ino, b"user.x", b"1", 0));
    // Owners may not lift it; root may.
    eperm("owner clears -a", fs.set_attr_flags(&USER, f.ino, 0));

    // An append-only directory takes new entries and keeps them.
    let d = fs.mkdir(&C, ROOT_INO, b"spool", 0o777).unwrap();
    fs.set_attr_flags(&C, d.ino, inode_flags::APPEND).unwrap();
    let j = fs.mknod(&USER, d.ino, b"job", 0o100644, 0).unwrap();
    eperm(
        "rename of it",
        fs.rename(&C, ROOT_INO, b"log", d.ino, b"moved", 0),
    );
    eperm("unlink in it", fs.unlink(d.ino, b"job"));
    eperm(
        "rename out of it",
        fs.rename(&C, d.ino, b"job", ROOT_INO, b"job", 0),
    );
    fs.set_attr_flags(&C, d.ino, 0).unwrap();
    fs.unlink(d.ino, b"job").unwrap();
    assert!(matches!(fs.lookup(d.ino, b"job"), Err(Error::NotFound)));
    fs.forget(j.ino, 1);
    fs.set_attr_flags(&C, f.ino, 0).unwrap();
    fs.unlink(ROOT_INO, b"log").unwrap();
    check(&fs);
}

#[test]
fn noatime_keeps_atime_new_inodes_inherit_flags_and_unknown_flags_are_refused() {
    let media = new_media(64 * MIB);
    let opts = MountOptions {
        atime: AtimeMode::Strictatime,
        ..MountOptions::default()
    };
    let fs = Fs::mount(Arc::clone(&media), opts).unwrap();
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, b"data").unwrap();
    let old = SetAttr {
        atime: Some(SetTime::At(1_000_000_000)),
        ..SetAttr::default()
    };
    fs.setattr(&C, f.ino, &old).unwrap();
    fs.set_attr_flags(&C, f.ino, inode_flags::NOATIME).unwrap();
    read_all(&fs, f.ino);
    assert_eq!(fs.getattr(f.ino).unwrap().atime_ns, 1_000_000_000);
    // Without the flag the same read moves atime (strictatime).
    fs.set_attr_flags(&C, f.ino, 0).unwrap();
    read_all(&fs, f.ino);
    assert!(fs.getattr(f.ino).unwrap().atime_ns > 1_000_000_000);

    let inheritable = inode_flags::NOATIME
        | inode_flags::NODUMP
        | inode_flags::SYNC
        | inode_flags::DIRSYNC
        | inode_flags::DAX;
    let d = fs.mkdir(&C, ROOT_INO, b"d", 0o755).unwrap();
    fs.set_attr_flags(&C, d.ino, inheritable | inode_flags::APPEND)
        .unwrap();
    let file = fs.mknod(&C, d.ino, b"file", 0o100644, 0).unwrap();
    let sub = fs.mkdir(&C, d.ino, b"sub", 0o755).unwrap();
    assert_eq!(
        fs.attr_flags(file.ino).unwrap(),
        inheritable & !inode_flags::DIRSYNC,
        "a file takes all but immutable, append-only and dirsync"
    );
    assert_eq!(fs.attr_flags(sub.ino).unwrap(), inheritable);
    // Bits that are not attribute flags are no one's to set.
    for bad in [inode_flags::ORPHAN, inode_flags::TREE, 1 << 15] {
        assert!(matches!(
            fs.set_attr_flags(&C, file.ino, bad),
            Err(Error::NotSupported)
        ));
    }
    assert_eq!(
        fs.attr_flags(file.ino).unwrap(),
        inheritable & !inode_flags::DIRSYNC
    );
    check(&fs);
}

/// Rewrites the file system (unmounted) as format version 1 wrote it: the superblock (both
/// copies) and a single-level inode-table directory naming the chunks, whose indirect
/// blocks are freed.
fn make_version_1(media: &Arc<dyn Media>) {
    let (mut sb, g) = read_superblock(media.as_ref()).unwrap();
    let (table, fault) = crate::meta::inode::TablePointers::read(media.as_ref(), &g).unwrap();
    assert!(fault.is_none() && table.chunks.len() <= 512);
    let mut dir = vec![0u8; BLOCK_SIZE as usize];
    for (k, c) in table.chunks.iter().enumerate() {
        dir[k * 8..k * 8 + 8].copy_from_slice(&c.to_le_bytes());
    }
    media.write(g.itable_dir_offset(), &dir).unwrap();
    for b in table.indirect {
        let word = g.bitmap_offset() + b / 64 * 8;
        media.fetch_and_u64(word, !(1 << (b % 64))).unwrap();
    }
    sb.itable_fanout = 0;
    sb.version = 1;
    sb.incompat = crate::format::IncompatFeatures::HASHED_DIRS.bits();
    sb.seal();
    upgrade_superblock(media.as_ref(), &sb).unwrap();
}

fn fs_superblock(media: &Arc<dyn Media>) -> Superblock {
    read_superblock(media.as_ref()).unwrap().0
}

#[test]
fn a_version_1_file_system_mounts_and_becomes_version_2_on_first_use() {
    use crate::format::{FORMAT_VERSION, IncompatFeatures as F};
    let media = new_media_v2(64 * MIB);
    let sb = fs_superblock(&media);
    assert_eq!(sb.version, FORMAT_VERSION - 1, "the version-2 layout");
    assert!(
        sb.incompat_features().contains(F::V2),
        "mkfs sets both features"
    );
    make_version_1(&media);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, b"x").unwrap();
    fs.set_attr_flags(&C, f.ino, 0).unwrap();
    check(&fs);
    assert_eq!(
        fs_superblock(&media).version,
        1,
        "nothing of version 2 used yet"
    );

    // A read-only mount cannot upgrade: the flag change is refused, the superblock stays.
    drop(fs);
    let ro = MountOptions {
        read_only: true,
        ..MountOptions::default()
    };
    let fs = Fs::mount(Arc::clone(&media), ro).unwrap();
    assert!(matches!(
        fs.set_attr_flags(&C, f.ino, inode_flags::NODUMP),
        Err(Error::ReadOnly)
    ));
    assert_eq!(fs_superblock(&media).version, 1);
    drop(fs);

    let fs = mount(&media);
    fs.set_attr_flags(&C, f.ino, inode_flags::NODUMP).unwrap();
    let sb = fs_superblock(&media);
    assert_eq!(sb.version, 2);
    assert_eq!(sb.incompat_features(), F::HASHED_DIRS | F::INODE_ATTR_FLAGS);
    assert_eq!(fs.superblock().incompat, sb.incompat);
    let backup = read_backup_superblock(media.as_ref()).unwrap().0;
    assert_eq!(
        zerocopy::IntoBytes::as_bytes(&backup),
        zerocopy::IntoBytes::as_bytes(&sb)
    );
    // A size above version 1's 2^44 adds the other feature.
    let big = SetAttr {
        size: Some(crate::format::V1_MAX_FILE_SIZE + 1),
        ..SetAttr::default()
    };
    fs.setattr(&C, f.ino, &big).unwrap();
    assert_eq!(
        fs_superblock(&media).incompat_features(),
        F::HASHED_DIRS | F::V2
    );
    check(&fs);
    drop(fs);
    let fs = mount(&media);
    assert_eq!(fs.attr_flags(f.ino).unwrap(), inode_flags::NODUMP);
    check(&fs);
}

/// A version-1 table (the directory names the chunks) grows and shrinks in place: no
/// indirect block appears, and the version stays 1.
#[test]
fn a_single_level_table_of_version_1_grows_and_shrinks_in_place() {
    let media = new_media_v2(64 * MIB);
    make_version_1(&media);
    let fs = mount(&media);
    fs.inode_table().count_chunks_full_for_test();
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap().ino;
    assert_eq!(
        f,
        crate::format::INODES_PER_CHUNK,
        "the first inode of chunk 1"
    );
    assert_eq!(fs.inode_table().chunk_blocks().len(), 2);
    assert!(fs.inode_table().indirect_blocks().is_empty());
    let (_, g) = read_superblock(media.as_ref()).unwrap();
    let (table, fault) = crate::meta::inode::TablePointers::read(media.as_ref(), &g).unwrap();
    assert_eq!((table.chunks.len(), fault), (2, None));
    check(&fs);
    fs.shutdown().unwrap();
    drop(fs);
    // A new mount (the test hook's counts gone) gives the emptied chunk back.
    let fs = mount(&media);
    fs.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(fs.inode_table().chunk_blocks().len(), 1, "given back");
    check(&fs);
    assert_eq!(fs_superblock(&media).version, 1);
}

#[test]
fn preallocation_past_2_44_with_keep_size_adds_the_large_files_feature() {
    use crate::format::IncompatFeatures as F;
    let media = new_media_v2(64 * MIB);
    make_version_1(&media);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    // The size stays small, but the extent lies past file block 2^32, which a version-1
    // reader refuses (the checker says so when the feature is missing).
    fs.fallocate(&C, f.ino, 1 << 45, 4096, libc::FALLOC_FL_KEEP_SIZE)
        .unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, 0);
    assert_eq!(
        fs_superblock(&media).incompat_features(),
        F::HASHED_DIRS | F::LARGE_FILES
    );
    check(&fs);
}

#[test]
fn files_of_2_63_minus_1_bytes_truncate_write_read_and_shrink() {
    use crate::format::MAX_FILE_SIZE;
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let free0 = fs.statfs().bfree;
    let f = fs.mknod(&C, ROOT_INO, b"huge", 0o100644, 0).unwrap();
    let to = |size| SetAttr {
        size: Some(size),
        ..SetAttr::default()
    };
    assert_eq!(MAX_FILE_SIZE, i64::MAX as u64);
    fs.setattr(&C, f.ino, &to(MAX_FILE_SIZE)).unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, MAX_FILE_SIZE);
    assert!(matches!(
        fs.setattr(&C, f.ino, &to(MAX_FILE_SIZE + 1)),
        Err(Error::FileTooBig)
    ));
    // The last byte a file can have, and the block before the 2^44 of version 1.
    fs.write(&C, f.ino, MAX_FILE_SIZE - 1, b"z").unwrap();
    fs.write(&C, f.ino, (1 << 44) - 1, b"y").unwrap();
    assert!(matches!(
        fs.write(&C, f.ino, MAX_FILE_SIZE, b"!"),
        Err(Error::FileTooBig)
    ));
    let mut got = Vec::new();
    fs.read(f.ino, MAX_FILE_SIZE - 1, 16, &mut |d| {
        got.extend_from_slice(d)
    })
    .unwrap();
    assert_eq!(got, b"z");
    assert_eq!(
        fs.lseek(f.ino, 1 << 45, libc::SEEK_DATA).unwrap(),
        ((MAX_FILE_SIZE - 1) & !(BLOCK_SIZE - 1)) as i64
    );
    check(&fs);
    drop(fs);
    let fs = mount(&media);
    let mut got = Vec::new();
    fs.read(f.ino, MAX_FILE_SIZE - 1, 1, &mut |d| {
        got.extend_from_slice(d)
    })
    .unwrap();
    assert_eq!(got, b"z");
    fs.setattr(&C, f.ino, &to(0)).unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().blocks, 0);
    fs.unlink(ROOT_INO, b"huge").unwrap();
    fs.forget(f.ino, 1);
    assert_eq!(fs.statfs().bfree, free0);
    check(&fs);
}

#[test]
fn rename_whiteout_leaves_a_0_0_character_device_owned_by_the_caller() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let d = fs.mkdir(&C, ROOT_INO, b"d", 0o777).unwrap();
    let a = fs.mknod(&USER, d.ino, b"a", 0o100644, 0).unwrap();
    let b = fs.mknod(&USER, d.ino, b"b", 0o100644, 0).unwrap();
    let entries = |fs: &Fs| fs.getattr(d.ino).unwrap().size;
    assert_eq!(entries(&fs), 2);
    // To a new name: "a" becomes a whiteout, "c" is the old a.
    fs.rename(&USER, d.ino, b"a", d.ino, b"c", RENAME_WHITEOUT)
        .unwrap();
    assert_eq!(fs.lookup(d.ino, b"c").unwrap().ino, a.ino);
    let w = fs.lookup(d.ino, b"a").unwrap();
    assert_ne!(w.ino, a.ino);
    assert_eq!(w.mode, u32::from(crate::format::file_type::S_IFCHR));
    assert_eq!((w.rdev, w.nlink, w.uid, w.gid), (0, 1, USER.uid, USER.gid));
    assert_eq!(entries(&fs), 3);
    // Over an existing name (with NOREPLACE that is EEXIST), and across directories.
    assert!(matches!(
        fs.rename(
            &USER,
            d.ino,
            b"b",
            d.ino,
            b"c",
            RENAME_WHITEOUT | RENAME_NOREPLACE
        ),
        Err(Error::Exists)
    ));
    fs.rename(&USER, d.ino, b"b", d.ino, b"c", RENAME_WHITEOUT)
        .unwrap();
    assert_eq!(fs.lookup(d.ino, b"c").unwrap().ino, b.ino);
    assert_eq!(fs.lookup(d.ino, b"b").unwrap().mode, w.mode);
    assert_eq!(entries(&fs), 3);
    let e = fs.mkdir(&C, ROOT_INO, b"e", 0o777).unwrap();
    fs.rename(
        &USER,
        d.ino,
        b"c",
        e.ino,
        b"c",
        RENAME_WHITEOUT | RENAME_NOREPLACE,
    )
    .unwrap();
    assert_eq!(fs.lookup(e.ino, b"c").unwrap().ino, b.ino);
    assert_eq!(entries(&fs), 3);
    // A directory leaves a whiteout too; the link counts follow the move.
    let sub = fs.mkdir(&C, d.ino, b"sub", 0o755).unwrap();
    fs.rename(&C, d.ino, b"sub", e.ino, b"sub", RENAME_WHITEOUT)
        .unwrap();
    assert_eq!(fs.getattr(d.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(e.ino).unwrap().nlink, 3);
    assert_eq!(fs.lookup(sub.ino, b"..").unwrap().ino, e.ino);
    assert_eq!(fs.lookup(d.ino, b"sub").unwrap().mode, w.mode);
    // EXCHANGE goes with no other flag; nothing changed by the refusals.
    for bad in [
        RENAME_WHITEOUT | RENAME_EXCHANGE,
        RENAME_NOREPLACE | RENAME_EXCHANGE,
        8,
    ] {
        assert!(matches!(
            fs.rename(&C, e.ino, b"c", e.ino, b"sub", bad),
            Err(Error::Invalid)
        ));
    }
    assert_eq!(fs.lookup(e.ino, b"c").unwrap().ino, b.ino);
    check(&fs);
    drop(fs);
    let fs = mount(&media);
    assert_eq!(fs.lookup(d.ino, b"a").unwrap().mode, w.mode);
    check(&fs);
}

#[test]
fn published_leases_publish_size_and_generation_and_allocate_nothing() {
    use crate::device::dax::StateTable;
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"published", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, &[7u8; 3 * 4096]).unwrap();
    let grow = SetAttr {
        size: Some(MIB),
        ..Default::default()
    };
    fs.setattr(&C, f.ino, &grow).unwrap();
    // No table configured: no published lease.
    assert!(fs.map_published(f.ino, None).is_err());
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let table_path = dir.path().join("state");
    fs.enable_published_leases(table_path.clone(), None);
    let blocks = fs.getattr(f.ino).unwrap().blocks;
    let p = fs.map_published(f.ino, None).unwrap();
    assert_eq!(
        fs.getattr(f.ino).unwrap().blocks,
        blocks,
        "a published lease allocated"
    );
    assert_eq!(p.extents.iter().map(|e| e.len).sum::<u64>(), 3 * 4096);
    let (slot, path) = fs.published_slot(f.ino).unwrap();
    assert_eq!(path, table_path);
    let table = StateTable::open(&path).unwrap();
    let s0 = table.snapshot(slot).unwrap();
    assert_eq!((s0.ino, s0.size, s0.generation), (f.ino, MIB, p.generation));
    // While an operation holds the inode's lock the slot is odd (no snapshot); reads under
    // the read lock leave it alone.
    {
        let _g = fs.lock_all(&[f.ino]);
        assert!(table.snapshot(slot).is_none());
    }
    let s1 = table.snapshot(slot).unwrap();
    assert!(s1.seq > s0.seq && s1.generation > s0.generation);
    fs.getattr(f.ino).unwrap();
    assert_eq!(table.snapshot(slot).unwrap(), s1);
    // A truncate publishes the new size and generation; a refresh lists the new layout.
    let shrink = SetAttr {
        size: Some(4096),
        ..Default::default()
    };
    fs.setattr(&C, f.ino, &shrink).unwrap();
    let s2 = table.snapshot(slot).unwrap();
    assert_eq!(s2.size, 4096);
    assert!(s2.generation > s1.generation);
    let r = fs.map_published(f.ino, Some(p.lease)).unwrap();
    assert_eq!((r.lease, r.generation), (p.lease, s2.generation));
    assert_eq!(r.extents.iter().map(|e| e.len).sum::<u64>(), 4096);
    // Another inode's lease is not a refresh of this one.
    let g = fs.mknod(&C, ROOT_INO, b"other", 0o100644, 0).unwrap();
    assert!(fs.map_published(g.ino, Some(p.lease)).is_err());
    // The last lease's end returns the slot, emptied.
    fs.end_lease(p.lease).unwrap();
    assert!(fs.published_slot(f.ino).is_none());
    assert_eq!(table.snapshot(slot).unwrap().ino, 0);
    drop(fs);
    assert!(!table_path.exists(), "the table outlived the file system");
}

#[test]
fn writes_to_a_leased_file_do_not_wait_for_the_deferred_free_lock() {
    // A lease defers a file's frees, which take the file-system-wide deferred-free lock;
    // a write that frees nothing must not queue on it (it serialised every process
    // writing its own leased file: "4 KiB rand write, new files, 4 threads" under the
    // preload library).
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"leased", 0o100644, 0).unwrap();
    // Past the first chunk and the stream start's reach: later writes move nothing.
    fs.write(&C, f.ino, 0, &vec![1u8; 5 * MIB as usize])
        .unwrap();
    let (lease, _) = fs.map_direct(f.ino, 0, 4096).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let held = fs.deferred_lock.lock();
        s.spawn(|| {
            let r = (
                fs.write(&C, f.ino, 3 * MIB, &[2u8; 4096]),
                fs.write(&C, f.ino, 9 * MIB, &[3u8; 4096]), // extends, into a hole
            );
            done_tx.send(r).unwrap();
        });
        let r = done_rx.recv_timeout(std::time::Duration::from_secs(20));
        drop(held);
        let (a, b) = r.expect("a write to a leased file waited for the deferred-free lock");
        assert_eq!((a.unwrap(), b.unwrap()), (4096, 4096));
    });
    let mut back = Vec::new();
    fs.read(f.ino, 9 * MIB, 4096, &mut |d| back = d.to_vec())
        .unwrap();
    assert_eq!(back, vec![3u8; 4096]);
    fs.end_lease(lease).unwrap();
    check(&fs);
}

#[test]
fn a_direct_client_allocates_ahead_stores_and_extends_the_size() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"appended", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, &vec![1u8; (3 * MIB) as usize])
        .unwrap();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    fs.enable_published_leases(dir.path().join("state"), None);
    let p = fs.map_published(f.ino, None).unwrap();
    // Allocate 3..5 MiB past the end of file: the size does not move, the layout does.
    let blocks = fs.getattr(f.ino).unwrap().blocks;
    assert_eq!(
        fs.allocate_for_client(f.ino, 3 * MIB, 2 * MIB).unwrap(),
        5 * MIB
    );
    assert_eq!(fs.getattr(f.ino).unwrap().size, 3 * MIB);
    assert!(fs.getattr(f.ino).unwrap().blocks > blocks);
    let r = fs.map_published(f.ino, Some(p.lease)).unwrap();
    assert!(r.generation > p.generation);
    // Store 3..4 MiB through the "mapping" (the device at the listed extents).
    let data: Vec<u8> = (0..MIB).map(|b| (b % 251) as u8).collect();
    let mut at = 3 * MIB;
    for e in &r.extents {
        assert!(!e.unwritten);
        let (s, t) = (at.max(e.file_offset), (4 * MIB).min(e.file_offset + e.len));
        if s < t {
            let src = &data[(s - 3 * MIB) as usize..(t - 3 * MIB) as usize];
            media
                .write(e.device_offset + (s - e.file_offset), src)
                .unwrap();
            at = t;
        }
    }
    assert_eq!(at, 4 * MIB, "the allocated range is not all listed");
    // A stale generation is refused; the listed one extends the size.
    assert!(matches!(
        fs.extend_for_client(&C, f.ino, 3 * MIB, 4 * MIB, p.generation),
        Err(Error::Changed)
    ));
    assert_eq!(fs.getattr(f.ino).unwrap().size, 3 * MIB);
    // Every write-locked request moves the generation, refused ones too.
    let (slot, path) = fs.published_slot(f.ino).unwrap();
    let table = crate::device::dax::StateTable::open(&path).unwrap();
    let now = table.snapshot(slot).unwrap().generation;
    assert!(now > r.generation);
    // Bytes that are not in written blocks cannot be claimed.
    assert!(matches!(
        fs.extend_for_client(&C, f.ino, 6 * MIB, 7 * MIB, now),
        Err(Error::Invalid)
    ));
    let now = table.snapshot(slot).unwrap().generation;
    fs.extend_for_client(&C, f.ino, 3 * MIB, 4 * MIB, now)
        .unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, 4 * MIB);
    let s = table.snapshot(slot).unwrap();
    assert_eq!((s.size, s.generation), (4 * MIB, now + 1));
    let mut got = Vec::new();
    fs.read(f.ino, 3 * MIB - 1, (MIB + 1) as u32, &mut |b| {
        got.extend_from_slice(b)
    })
    .unwrap();
    assert_eq!(got[0], 1);
    assert!(got[1..] == data[..], "the stored bytes are not the file's");
    // At release the allocation past the end of file goes back (4 MiB: whole chunks).
    let before = fs.getattr(f.ino).unwrap().blocks;
    fs.trim_client_allocation(f.ino, 5 * MIB).unwrap();
    let after = fs.getattr(f.ino).unwrap().blocks;
    assert_eq!(
        before - after,
        2 * MIB / 512,
        "the chunk past the end of file stayed"
    );
    assert_eq!(fs.getattr(f.ino).unwrap().size, 4 * MIB);
    fs.end_lease(p.lease).unwrap();
    check(&fs);
}

#[test]
fn a_direct_client_allocation_zeroes_preallocated_space_inside_the_file() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"laid-out", 0o100644, 0).unwrap();
    // Stale bytes in free space, then preallocate the file over them (mode 0: size set).
    let junk = fs.mknod(&C, ROOT_INO, b"junk", 0o100644, 0).unwrap();
    fs.write(&C, junk.ino, 0, &vec![0xeeu8; (8 * MIB) as usize])
        .unwrap();
    fs.unlink(ROOT_INO, b"junk").unwrap();
    fs.fallocate(&C, f.ino, 0, 8 * MIB, 0).unwrap();
    fs.allocate_for_client(f.ino, 0, 8 * MIB).unwrap();
    assert!(fs.layout(f.ino).unwrap().iter().all(|e| !e.unwritten));
    let mut got = Vec::new();
    fs.read(f.ino, 0, (8 * MIB) as u32, &mut |b| {
        got.extend_from_slice(b)
    })
    .unwrap();
    assert_eq!(got.len() as u64, 8 * MIB);
    assert!(
        got.iter().all(|&b| b == 0),
        "converted space shows old bytes"
    );
    check(&fs);
}

/// The bytes of `ino`'s block holding its end of file that lie past it, read from the device.
fn eof_tail_on_device(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    let end = size.next_multiple_of(BLOCK_SIZE);
    let mut out = Vec::new();
    for e in fs.layout(ino).unwrap() {
        let (s, t) = (size.max(e.file_offset), end.min(e.file_offset + e.len));
        if s < t && !e.unwritten {
            let mut b = vec![0u8; (t - s) as usize];
            fs.media()
                .read(e.device_offset + (s - e.file_offset), &mut b)
                .unwrap();
            out.extend_from_slice(&b);
        }
    }
    out
}

#[test]
fn the_block_holding_the_end_of_file_is_zero_past_it_after_every_change() {
    // A direct mapping's partial last page shows these bytes (fsx under the preload library
    // saw a freed file's bytes there after a copy_file_range extended a file into a fresh
    // block): writes, extensions, truncates up and down and direct clients' extensions
    // all leave them zero, over free space full of another file's bytes.
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let junk = fs.mknod(&C, ROOT_INO, b"junk", 0o100644, 0).unwrap();
    fs.write(&C, junk.ino, 0, &vec![0xeeu8; (24 * MIB) as usize])
        .unwrap();
    fs.unlink(ROOT_INO, b"junk").unwrap();
    let f = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap();
    let zero_tail = |what: &str| {
        let tail = eof_tail_on_device(&fs, f.ino);
        assert!(
            tail.iter().all(|&b| b == 0),
            "{what}: {} of {} bytes past the end of file are not zero",
            tail.iter().filter(|&&b| b != 0).count(),
            tail.len()
        );
    };
    fs.write(&C, f.ino, 0, &[1u8; 5000]).unwrap();
    zero_tail("a small write into fresh blocks");
    fs.write(&C, f.ino, 5000, &vec![2u8; (3 * MIB) as usize])
        .unwrap();
    zero_tail("a write that makes the file large");
    // The rest of the last chunk is the file's past its end: a write beyond a gap lands in
    // such a block, not a fresh one.
    let size = fs.getattr(f.ino).unwrap().size;
    fs.write(&C, f.ino, size + 7, &[3u8; 100]).unwrap();
    zero_tail("a write past a gap into a kept block");
    let size = fs.getattr(f.ino).unwrap().size;
    fs.fallocate(&C, f.ino, size, 5000, 0).unwrap();
    zero_tail("fallocate growing the file");
    let size = fs.getattr(f.ino).unwrap().size;
    let resize = |size: u64| {
        let sa = SetAttr {
            size: Some(size),
            ..Default::default()
        };
        fs.setattr(&C, f.ino, &sa).unwrap();
    };
    resize(size + 9000);
    zero_tail("a truncate up");
    resize(3 * MIB + 10);
    zero_tail("a truncate down");
    // A direct client: allocation past the end, stores, extension.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    fs.enable_published_leases(dir.path().join("state"), None);
    let p = fs.map_published(f.ino, None).unwrap();
    let size = fs.getattr(f.ino).unwrap().size;
    fs.allocate_for_client(f.ino, size, 2 * MIB).unwrap();
    let (slot, path) = fs.published_slot(f.ino).unwrap();
    let table = crate::device::dax::StateTable::open(&path).unwrap();
    let now = table.snapshot(slot).unwrap().generation;
    fs.extend_for_client(&C, f.ino, size, size + 333, now)
        .unwrap();
    zero_tail("a direct client's extension");
    fs.end_lease(p.lease).unwrap();
    check(&fs);
}

#[test]
fn a_direct_clients_read_updates_the_access_time_without_moving_the_generation() {
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"read", 0o100644, 0).unwrap();
    fs.write(&C, f.ino, 0, &[7u8; 5000]).unwrap();
    let sa = SetAttr {
        atime: Some(SetTime::At(1)),
        ..Default::default()
    };
    fs.setattr(&C, f.ino, &sa).unwrap();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    fs.enable_published_leases(dir.path().join("state"), None);
    let p = fs.map_published(f.ino, None).unwrap();
    let before = fs.published_generation(f.ino);
    // relatime: due (the access time is before the modification time), then not again.
    assert!(
        !fs.accessed_by_client(f.ino).unwrap(),
        "relatime is not strict"
    );
    let atime = fs.getattr(f.ino).unwrap().atime_ns;
    assert!(atime > 1, "the access time did not move");
    assert!(!fs.accessed_by_client(f.ino).unwrap());
    assert_eq!(fs.getattr(f.ino).unwrap().atime_ns, atime, "stamped twice");
    assert_eq!(
        fs.published_generation(f.ino),
        before,
        "an access-time stamp moved the generation: every served read would refresh"
    );
    fs.end_lease(p.lease).unwrap();
    check(&fs);
}

#[test]
fn the_layout_lists_the_last_block_a_file_can_have() {
    // A byte at 2^63 - 2 lives in file block 2^51 - 1; the listing stopped one block short,
    // and the preload library, trusting it, served zeros for it (xfstests generic/525).
    let media = new_media(64 * MIB);
    let fs = mount(&media);
    let f = fs.mknod(&C, ROOT_INO, b"huge", 0o100644, 0).unwrap();
    use crate::format::{MAX_FILE_BLOCKS, MAX_FILE_SIZE, blocks_to_bytes};
    fs.write(&C, f.ino, MAX_FILE_SIZE - 1, b"a").unwrap();
    let last = blocks_to_bytes(MAX_FILE_BLOCKS - 1);
    let listed = |exts: &[MappedExtent]| exts.iter().any(|e| e.file_offset == last && !e.unwritten);
    assert!(listed(&fs.layout(f.ino).unwrap()), "layout");
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    fs.enable_published_leases(dir.path().join("state"), None);
    let p = fs.map_published(f.ino, None).unwrap();
    assert!(listed(&p.extents), "published lease: {:?}", p.extents);
    fs.end_lease(p.lease).unwrap();
    check(&fs);
}
