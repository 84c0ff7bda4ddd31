//! The two-level inode table: growth past the old 512-chunk cap with the real fan-out,
//! crashes at every fence while the table grows into a new indirect block and while it
//! shrinks out of one, and images whose table pointers are hostile.
//!
//! `InodeTable::count_chunks_full_for_test` makes the next create grow the table without
//! first creating 8188 inodes per chunk; everything on the media is what the core writes.

use super::*;
use crate::device::RecordingDevice;
use crate::format::{CHUNK_BLOCKS, INODES_PER_CHUNK, ROOT_INO, USABLE_INODES_PER_CHUNK};
use crate::meta::inode::TablePointers;
use crate::mkfs::{MkfsOptions, format};

const MIB: u64 = 1 << 20;
const C: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};
/// The inode numbers the single-level table (versions 1 and 2) could address.
const OLD_MAX_INODES: u64 = 512 * INODES_PER_CHUNK;

fn device(size: u64, fanout: Option<u64>) -> Arc<RecordingDevice> {
    let dev = Arc::new(RecordingDevice::new(size));
    let opts = MkfsOptions {
        itable_fanout: fanout,
        ..MkfsOptions::default()
    };
    format(dev.as_ref(), &opts).unwrap();
    dev
}

fn opts() -> MountOptions {
    MountOptions {
        atime: AtimeMode::Noatime,
        ..MountOptions::default()
    }
}

fn mount(media: &Arc<dyn Media>) -> Fs {
    Fs::mount(Arc::clone(media), opts()).unwrap()
}

fn assert_clean(media: &Arc<dyn Media>, what: &str) {
    let report = crate::check::check(media).unwrap();
    assert!(
        report.problems.is_empty(),
        "{what}: consistency check: {:#?}",
        report.problems
    );
}

fn pointers(media: &Arc<dyn Media>) -> TablePointers {
    let (_, g) = crate::meta::read_superblock(media.as_ref()).unwrap();
    let (p, fault) = TablePointers::read(media.as_ref(), &g).unwrap();
    assert_eq!(fault, None);
    p
}

/// Creates `name` in a new chunk: every chunk counts as full first, so the create grows
/// the table by one chunk and takes its first inode.
fn create_in_new_chunk(fs: &Fs, name: &str) -> u64 {
    fs.inode_table().count_chunks_full_for_test();
    fs.mknod(&C, ROOT_INO, name.as_bytes(), 0o100644, 0)
        .unwrap()
        .ino
}

#[test]
fn the_table_grows_past_512_chunks_with_the_real_fanout_and_shrinks_back() {
    // 513 chunks of inodes need a device of more than 1 GiB.
    let dev = device(1100 * MIB, None);
    let media: Arc<dyn Media> = dev.clone();
    let fs = mount(&media);
    let fresh = fs.statfs();
    let mut files = Vec::new();
    for k in 1..=512u64 {
        let ino = create_in_new_chunk(&fs, &format!("f{k}"));
        assert_eq!(ino, k * INODES_PER_CHUNK, "the first inode of chunk {k}");
        files.push(ino);
    }
    let last = *files.last().unwrap();
    assert!(last >= OLD_MAX_INODES, "inode {last} lies past the old cap");
    fs.write(&C, last, 0, b"past the old cap").unwrap();
    fs.shutdown().unwrap();
    drop(fs);
    let p = pointers(&media);
    assert_eq!((p.chunks.len(), p.indirect.len()), (513, 2));
    assert_clean(&media, "513 chunks");

    // A new mount reads only the pointers, then finds every file; the first statfs counts
    // the inodes in use from the chunks' bitmaps (the hook's counts are gone).
    let fs = mount(&media);
    let st = fs.statfs();
    assert_eq!(st.files - st.ffree, fresh.files - fresh.ffree + 512);
    assert!(st.files >= 513 * USABLE_INODES_PER_CHUNK);
    let mut buf = Vec::new();
    fs.read(last, 0, 100, &mut |d| buf.extend_from_slice(d))
        .unwrap();
    assert_eq!(buf, b"past the old cap");
    assert_eq!(fs.lookup(ROOT_INO, b"f512").unwrap().ino, last);
    fs.forget(last, 1); // the lookup's reference: unlinked, the inode is freed at once
    // Unlinking from the end gives every emptied chunk back, and the second indirect block
    // with the chunk it held.
    for k in (1..=512u64).rev() {
        fs.unlink(ROOT_INO, format!("f{k}").as_bytes()).unwrap();
    }
    assert_eq!(fs.inode_table().chunk_blocks().len(), 1);
    assert_eq!(fs.inode_table().indirect_blocks().len(), 1);
    assert_eq!(
        fs.statfs().bfree,
        fresh.bfree,
        "every table block came back"
    );
    fs.shutdown().unwrap();
    drop(fs);
    assert_clean(&media, "shrunk back");
}

/// Mounts every crash image of every fence recorded on `dev`, checks it, and hands the
/// mounted file system and the fence to `verify`. Returns the images checked.
fn every_crash_image(dev: &RecordingDevice, verify: &mut dyn FnMut(usize, &Fs)) -> usize {
    dev.stop_recording();
    let fences = dev.fence_count();
    let mut checked = 0;
    for f in 0..=fences {
        for image in dev.crash_images(f).enumerate(5, 12, f as u64 * 7919 + 1) {
            let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(image));
            let fs = Fs::mount(Arc::clone(&media), opts())
                .unwrap_or_else(|e| panic!("fence {f}/{fences}: mount after crash: {e}"));
            verify(f, &fs);
            fs.shutdown().unwrap();
            drop(fs);
            assert_clean(&media, &format!("fence {f}/{fences}"));
            checked += 1;
        }
    }
    assert!(checked > fences);
    checked
}

/// With one chunk per indirect block, every growth adds an indirect block and every shrink
/// frees one: a create that grows the table is all or nothing at every fence.
#[test]
fn a_crash_at_every_fence_of_growth_into_a_new_indirect_block() {
    let dev = device(24 * MIB, Some(1));
    let media: Arc<dyn Media> = dev.clone();
    let fs = mount(&media);
    fs.inode_table().count_chunks_full_for_test();
    dev.start_recording();
    let ino = fs.mknod(&C, ROOT_INO, b"f", 0o100644, 0).unwrap().ino;
    let done = dev.fence_count();
    assert_eq!(ino, INODES_PER_CHUNK, "the first inode of chunk 1");
    assert_eq!(fs.inode_table().indirect_blocks().len(), 2);
    drop(fs);
    let checked = every_crash_image(&dev, &mut |f, fs| {
        match fs.lookup(ROOT_INO, b"f") {
            Ok(a) => assert_eq!(a.ino, ino, "fence {f}"),
            Err(Error::NotFound) => assert!(f < done, "fence {f}: the create was lost"),
            Err(e) => panic!("fence {f}: {e}"),
        }
        let table = fs.inode_table();
        assert_eq!(
            table.chunk_blocks().len(),
            table.indirect_blocks().len(),
            "fence {f}"
        );
    });
    eprintln!("growth: {done} fences, {checked} crash images checked");
}

#[test]
fn a_crash_at_every_fence_of_a_shrink_out_of_an_indirect_block() {
    let dev = device(24 * MIB, Some(1));
    let media: Arc<dyn Media> = dev.clone();
    let fs = mount(&media);
    let fresh = fs.statfs();
    create_in_new_chunk(&fs, "f");
    fs.shutdown().unwrap();
    drop(fs);
    let fs = mount(&media);
    assert_eq!(fs.inode_table().chunk_blocks().len(), 2);
    dev.start_recording();
    fs.unlink(ROOT_INO, b"f").unwrap();
    let done = dev.fence_count();
    assert_eq!(fs.inode_table().chunk_blocks().len(), 1, "shrunk");
    assert_eq!(fs.statfs().bfree, fresh.bfree);
    drop(fs);
    let checked = every_crash_image(&dev, &mut |f, fs| {
        let table = fs.inode_table();
        let chunks = table.chunk_blocks().len();
        assert_eq!(chunks, table.indirect_blocks().len(), "fence {f}");
        match fs.lookup(ROOT_INO, b"f") {
            Ok(_) => assert!(f < done && chunks == 2, "fence {f}: unlink undone"),
            // The mount gives back a chunk a crash left empty.
            Err(Error::NotFound) => {
                assert_eq!(chunks, 1, "fence {f}");
                assert_eq!(fs.statfs().bfree, fresh.bfree, "fence {f}: blocks leaked");
            }
            Err(e) => panic!("fence {f}: {e}"),
        }
    });
    eprintln!("shrink: {done} fences, {checked} crash images checked");
}

/// A table of three chunks over two indirect blocks (fan-out 2), unmounted cleanly.
fn three_chunk_image() -> (Vec<u8>, Geometry, TablePointers) {
    let dev = device(24 * MIB, Some(2));
    let media: Arc<dyn Media> = dev.clone();
    let fs = mount(&media);
    create_in_new_chunk(&fs, "f1");
    create_in_new_chunk(&fs, "f2");
    fs.shutdown().unwrap();
    drop(fs);
    let p = pointers(&media);
    assert_eq!((p.chunks.len(), p.indirect.len()), (3, 2));
    let g = crate::meta::read_superblock(media.as_ref()).unwrap().1;
    (dev.snapshot(), g, p)
}

fn put(image: &mut [u8], offset: u64, value: u64) {
    let o = offset as usize;
    image[o..o + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn hostile_table_pointers_are_errors_and_fsck_cuts_the_table_there() {
    let (base, g, p) = three_chunk_image();
    let dir = g.itable_dir_offset();
    let ind = |i: usize, e: u64| crate::format::blocks_to_bytes(p.indirect[i]) + e * 8;
    let holder = p.indirect[1] - p.indirect[1] % CHUNK_BLOCKS;
    let cases: Vec<(&str, u64, u64, &str)> = vec![
        (
            "directory names itself",
            dir + 8,
            g.itable_dir_block,
            "not in the data area",
        ),
        (
            "directory names the journal",
            dir + 8,
            2,
            "not in the data area",
        ),
        (
            "indirect past the device",
            dir + 8,
            g.block_count + 5,
            "not in the data area",
        ),
        (
            "indirect block twice",
            dir + 8,
            p.indirect[0],
            "listed twice",
        ),
        ("chunk twice", ind(1, 0), p.chunks[0], "listed twice"),
        (
            "unaligned chunk",
            ind(0, 1),
            p.chunks[1] + 1,
            "not an aligned chunk",
        ),
        (
            "chunk in metadata",
            ind(0, 1),
            g.itable_dir_block,
            "not an aligned chunk",
        ),
        (
            "chunk past the device",
            ind(0, 1),
            u64::MAX - 511,
            "not an aligned chunk",
        ),
        (
            "chunk holding an indirect block",
            ind(1, 0),
            holder,
            "indirect block",
        ),
        ("empty indirect block", ind(1, 0), 0, "is empty"),
        ("indirect after a partial one", ind(0, 1), 0, "not full"),
    ];
    for (name, at, value, expect) in cases {
        let mut image = base.clone();
        put(&mut image, at, value);
        let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(image));
        match Fs::mount(Arc::clone(&media), opts()) {
            Err(Error::Corrupted { what, detail, .. }) => {
                assert_eq!(what, "inode table directory", "{name}");
                assert!(detail.contains(expect), "{name}: {detail}");
            }
            Err(e) => panic!("{name}: unexpected error {e}"),
            Ok(_) => panic!("{name}: mounted"),
        }
        let report = crate::repair::diagnose(&media).unwrap();
        assert!(
            report.problems.iter().any(|p| p.message.contains(expect)),
            "{name}: {:#?}",
            report.problems
        );
        let out = crate::repair::repair(&media, &report, crate::repair::RepairMode::all()).unwrap();
        assert!(out.changed(), "{name}");
        assert!(
            out.report.problems.is_empty(),
            "{name}: {:#?}",
            out.report.problems
        );
        let fs = mount(&media);
        assert!(fs.getattr(ROOT_INO).is_ok(), "{name}");
        // The cut table grows again.
        create_in_new_chunk(&fs, "again");
        fs.shutdown().unwrap();
        drop(fs);
        assert_clean(&media, name);
    }
}
