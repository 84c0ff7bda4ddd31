//! A file system over several devices (members as windows onto one recording device), on
//! the core without FUSE: mkfs, fsck and the mount over the set, data on both members, the
//! gaps never handed out, and hostile layouts refused.

use super::*;
use crate::device::{RecordingDevice, Window};
use crate::format::devices::{DEVICE_TABLE_OFFSET, DeviceTable, MemberHeader};
use crate::format::{BLOCK_SIZE, REGION_SIZE, ROOT_INO, Superblock};
use crate::meta::devices::{NamedMedia, assemble};
use crate::mkfs::{MemberSpec, MkfsOptions, format_devices};
use zerocopy::{FromBytes, IntoBytes};

const MIB: u64 = 1 << 20;
const C: Ctx = Ctx::ROOT;

/// Members of `sizes` bytes as windows onto one recording device, named `dev0`, `dev1`...
pub(crate) fn members(sizes: &[u64]) -> (Arc<RecordingDevice>, Vec<NamedMedia>) {
    let rec = Arc::new(RecordingDevice::new(sizes.iter().sum()));
    let inner: Arc<dyn Media> = rec.clone();
    let mut at = 0;
    let named = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let w = Window::new(Arc::clone(&inner), at, len).unwrap();
            at += len;
            NamedMedia {
                name: format!("dev{i}").into(),
                media: Arc::new(w),
            }
        })
        .collect();
    (rec, named)
}

/// Formats the members (member k on node k) and returns the assembled set.
pub(crate) fn format_members(named: &[NamedMedia]) -> Arc<dyn Media> {
    let specs: Vec<MemberSpec> = named
        .iter()
        .enumerate()
        .map(|(i, n)| MemberSpec {
            media: Arc::clone(&n.media),
            node: i as u32,
        })
        .collect();
    format_devices(&specs, &MkfsOptions::default()).unwrap();
    assemble(named.to_vec()).unwrap().media
}

fn check_clean(media: &Arc<dyn Media>) {
    let report = crate::check::check(media).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

#[test]
fn fresh_multi_device_file_system_is_clean_and_mounts() {
    let (_rec, named) = members(&[64 * MIB, 32 * MIB, 16 * MIB + 5 * BLOCK_SIZE]);
    let media = format_members(&named);
    assert_eq!(media.size(), 2 * REGION_SIZE + 16 * MIB);
    check_clean(&media);
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let st = fs.statfs();
    // No block of a gap or a member header is counted, free or in all.
    let members = 64 * MIB + 32 * MIB + 16 * MIB + 5 * BLOCK_SIZE - 2 * BLOCK_SIZE;
    assert!(st.blocks * BLOCK_SIZE <= members, "{st:?}");
    assert!(
        st.bfree < st.blocks && st.bfree * BLOCK_SIZE > 100 * MIB,
        "{st:?}"
    );
}

/// Data fills member 0, then goes on to the other members; every extent lies inside one
/// member, never in a gap; fsck agrees, and it all survives a remount.
#[test]
fn data_spills_over_members_and_never_into_gaps() {
    let (_rec, named) = members(&[32 * MIB, 32 * MIB, 32 * MIB]);
    let media = format_members(&named);
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    let mut files = Vec::new();
    for n in 0..20u8 {
        let f = fs
            .mknod(&C, ROOT_INO, format!("f{n}").as_bytes(), 0o100644, 0)
            .unwrap();
        let data = vec![n.wrapping_mul(37) | 1; (4 * MIB) as usize];
        match fs.write(&C, f.ino, 0, &data) {
            Ok(_) => files.push((f.ino, data)),
            Err(Error::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(files.len() >= 15, "only {} files of 4 MiB fit", files.len());
    // Direct mapping needs one device file: refused, not mapped at logical offsets.
    assert!(matches!(
        fs.map_direct(files[0].0, 0, 4096),
        Err(Error::NotSupported)
    ));
    assert!(matches!(
        fs.map_published(files[0].0, None),
        Err(Error::NotSupported)
    ));
    let mut on_member = [0u64; 3];
    for (ino, _) in &files {
        for e in fs.layout(*ino).unwrap() {
            let m = (e.device_offset / REGION_SIZE) as usize;
            let within = e.device_offset % REGION_SIZE + e.len;
            assert!(
                m < 3 && within <= 32 * MIB,
                "extent {e:?} outside every member"
            );
            on_member[m] += e.len;
        }
    }
    assert!(on_member.iter().all(|&b| b > 0), "{on_member:?}");
    check_clean(&media);
    drop(fs);
    let media = assemble(named).unwrap().media;
    check_clean(&media);
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
    for (ino, data) in &files {
        let mut got = Vec::new();
        let mut off = 0;
        while off < data.len() as u64 {
            fs.read(*ino, off, 1 << 20, &mut |d| got.extend_from_slice(d))
                .unwrap();
            off = got.len() as u64;
        }
        assert!(got == *data, "inode {ino} read back differs");
    }
}

fn sb_of(media: &dyn Media) -> Superblock {
    let mut buf = [0u8; 256];
    media.read(0, &mut buf).unwrap();
    Superblock::decode(&buf).unwrap()
}

#[test]
fn wrong_missing_swapped_or_foreign_members_are_refused() {
    let (_rec, named) = members(&[32 * MIB, 16 * MIB, 16 * MIB]);
    format_members(&named);
    let (_rec2, other) = members(&[32 * MIB, 16 * MIB]);
    format_members(&other);
    let err = |devs: Vec<NamedMedia>| assemble(devs).unwrap_err().to_string();
    let n = |i: usize| named[i].clone();

    // Any order after the first works.
    assert!(assemble(vec![n(0), n(2), n(1)]).is_ok());
    let e = err(vec![n(0), n(1)]);
    assert!(
        e.starts_with("dev0: member 2 of 3") && e.contains("-o device="),
        "{e}"
    );
    let e = err(vec![n(1), n(0), n(2)]);
    assert!(e.starts_with("dev1: is member 1 of 3"), "{e}");
    let e = err(vec![n(0), n(1), n(1)]);
    assert!(e.contains("already named as dev1"), "{e}");
    let mut foreign = other[1].clone();
    foreign.name = "foreign".into();
    let e = err(vec![n(0), n(1), foreign]);
    assert!(
        e.starts_with("foreign: belongs to another file system"),
        "{e}"
    );
    let mut single = other[0].clone();
    single.name = "plain".into();
    let e = err(vec![n(0), n(1), n(2), single]);
    assert!(e.starts_with("plain: not a member"), "{e}");
    // A single-device file system given members.
    let (_r3, lone) = members(&[32 * MIB]);
    crate::mkfs::format(lone[0].media.as_ref(), &MkfsOptions::default()).unwrap();
    let e = err(vec![lone[0].clone(), n(1)]);
    assert!(e.contains("single-device file system"), "{e}");
    // Member 0 alone, through the core: one clear error, not a geometry complaint.
    let e = Fs::mount(Arc::clone(&named[0].media), MountOptions::default()).unwrap_err();
    assert!(e.to_string().contains("spans 3 devices"), "{e}");
}

/// Damaged or hostile tables and headers are errors, in bounded time.
#[test]
fn damaged_tables_and_headers_are_refused() {
    let (_rec, named) = members(&[32 * MIB, 16 * MIB]);
    format_members(&named);
    let m0 = &named[0].media;
    let mut raw = vec![0u8; size_of::<DeviceTable>()];
    m0.read(DEVICE_TABLE_OFFSET, &mut raw).unwrap();
    let good = raw.clone();
    // A flipped bit, then a re-sealed table with overlapping members and a huge count.
    raw[40] ^= 4;
    m0.write(DEVICE_TABLE_OFFSET, &raw).unwrap();
    let e = assemble(named.clone()).unwrap_err().to_string();
    assert!(e.starts_with("dev0: device table: checksum"), "{e}");
    for mutate in [
        (|t: &mut DeviceTable| t.entries[1].base = 16 * MIB) as fn(&mut DeviceTable),
        |t| t.count = 1 << 30,
        |t| t.entries[1].size = 1 << 62,
    ] {
        let mut t = DeviceTable::read_from_bytes(&good).unwrap();
        mutate(&mut t);
        t.seal();
        m0.write(DEVICE_TABLE_OFFSET, t.as_bytes()).unwrap();
        let e = assemble(named.clone()).unwrap_err().to_string();
        assert!(e.starts_with("dev0: device table: corrupted"), "{e}");
    }
    m0.write(DEVICE_TABLE_OFFSET, &good).unwrap();
    assert!(assemble(named.clone()).is_ok());
    // A member header that says another size.
    let m1 = &named[1].media;
    let mut h = [0u8; 256];
    m1.read(0, &mut h).unwrap();
    let mut header = MemberHeader::read_from_bytes(&h).unwrap();
    header.size *= 2;
    header.seal();
    m1.write(0, header.as_bytes()).unwrap();
    let e = assemble(named.clone()).unwrap_err().to_string();
    assert!(e.starts_with("dev1: says"), "{e}");
    let _ = sb_of(m0.as_ref());
}

/// fsck finds a gap whose bits were cleared (blocks the allocator could hand out that are on
/// no device), and the repair restores them.
#[test]
fn fsck_knows_the_gaps() {
    let (_rec, named) = members(&[32 * MIB, 16 * MIB]);
    let media = format_members(&named);
    let sb = sb_of(media.as_ref());
    let g = crate::format::Geometry::from_superblock(&sb, media.size()).unwrap();
    // Clear one word of bitmap in the middle of the gap (blocks 32 MiB.. of logical space).
    let gap_block = 64 * MIB / BLOCK_SIZE;
    let word = g.bitmap_offset() + gap_block / 8;
    media.write(word, &[0u8; 8]).unwrap();
    let report = crate::check::check(&media).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("free") || p.message.contains("bitmap")),
        "{:#?}",
        report.problems
    );
    crate::repair::repair(&media, &report, crate::repair::RepairMode::all()).unwrap();
    check_clean(&media);
}

/// Threads pinned to "nodes" 0 and 1 (the test hook) write files at the same time: each
/// file's data is on the member of its writer's node, until that member is full; then the
/// writes go on elsewhere rather than fail.
#[test]
fn new_data_goes_to_the_member_of_the_writing_threads_node() {
    let (_rec, named) = members(&[64 * MIB, 64 * MIB]);
    let media = format_members(&named);
    let fs = Arc::new(Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap());
    let member_of = |off: u64| (off / REGION_SIZE) as u32;
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = [0u32, 1]
        .into_iter()
        .map(|node| {
            let fs = Arc::clone(&fs);
            let progress = Arc::clone(&progress);
            std::thread::spawn(move || {
                set_thread_node(Some(node));
                let mut inos = Vec::new();
                for n in 0..6 {
                    let name = format!("n{node}-{n}");
                    let f = fs
                        .mknod(&C, ROOT_INO, name.as_bytes(), 0o100644, 0)
                        .unwrap();
                    fs.write(&C, f.ino, 0, &vec![node as u8 + 1; (4 * MIB) as usize])
                        .unwrap();
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    inos.push(f.ino);
                }
                inos
            })
        })
        .collect();
    // Watchdog: a hang is a failure.
    let start = std::time::Instant::now();
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 12 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "writers stopped making progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for (node, w) in workers.into_iter().enumerate() {
        for ino in w.join().unwrap() {
            for e in fs.layout(ino).unwrap() {
                assert_eq!(
                    member_of(e.device_offset),
                    node as u32,
                    "inode {ino}: {e:?}"
                );
            }
        }
    }
    // Node 1's member full: its writer spills over to member 0.
    set_thread_node(Some(1));
    let f = fs.mknod(&C, ROOT_INO, b"spill", 0o100644, 0).unwrap();
    let mut off = 0;
    while fs
        .layout(f.ino)
        .unwrap()
        .iter()
        .all(|e| member_of(e.device_offset) == 1)
    {
        fs.write(&C, f.ino, off, &vec![9; (2 * MIB) as usize])
            .unwrap();
        off += 2 * MIB;
        assert!(off < 64 * MIB, "never left member 1");
    }
    set_thread_node(None);
    check_clean(&media);
}
