//! Direct (DAX-style) mapping through a real mount: coherence with read(2)/write(2) under
//! `cache=direct`, leases that keep truncated blocks from being reused, `pmfs layout`.
//! Needs root and /dev/fuse.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use pmfs::dax::DaxMapping;
use std::fs::{self, OpenOptions as FileOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::Command;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

#[test]
fn mapping_is_coherent_with_the_mount_and_truncate_never_hands_blocks_to_another_file() {
    assert!(can_mount());
    let img = Image::new("dax", 256 * MIB);
    let m = Mount::new(&img, "");
    let path = m.path("mapped");
    let data = pattern(7, (6 * MIB) as usize);
    fs::write(&path, &data).unwrap();
    let file = FileOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let map = DaxMapping::map(&file, 0, 6 * MIB).unwrap();
    assert_eq!(map.len() as u64, 6 * MIB);
    assert!(
        map.is_huge_aligned(),
        "a 6 MiB file should map as 2 MiB-aligned extents"
    );
    // The mapping sees what write(2) wrote...
    let mut buf = vec![0u8; 4096];
    map.read(3 * MIB as usize, &mut buf).unwrap();
    assert_eq!(buf, data[3 * MIB as usize..3 * MIB as usize + 4096]);
    // ...and read(2) through the mount sees stores through the mapping.
    map.write(5000, b"stored through the mapping").unwrap();
    map.persist(5000, 26).unwrap();
    let mut back = [0u8; 26];
    file.read_exact_at(&mut back, 5000).unwrap();
    assert_eq!(&back, b"stored through the mapping");
    // A write(2) after mapping shows in the mapping at once (cache=direct).
    file.write_all_at(b"from write(2)", 2 * MIB + 1).unwrap();
    let mut seen = [0u8; 13];
    map.read(2 * MIB as usize + 1, &mut seen).unwrap();
    assert_eq!(&seen, b"from write(2)");

    // Truncate while mapped: the blocks must not go to another file.
    file.set_len(0).unwrap();
    let other = pattern(99, (64 * MIB) as usize);
    let mut o = fs::File::create(m.path("other")).unwrap();
    o.write_all(&other).unwrap();
    drop(o);
    map.read(3 * MIB as usize, &mut buf).unwrap();
    assert_eq!(
        buf,
        data[3 * MIB as usize..3 * MIB as usize + 4096],
        "mapped blocks were reused"
    );
    let out = Command::new(PMFS)
        .arg("layout")
        .arg(m.path("other"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().count() >= 1);
    for line in text.lines() {
        let f: Vec<u64> = line
            .split(' ')
            .take(3)
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(f[0] % (2 * MIB), 0, "layout line {line}: not aligned");
        assert_eq!(f[1] % (2 * MIB), 0, "layout line {line}: not aligned");
    }

    // Dropping the mapping and closing the file ends the lease: the space comes back.
    let before = fs2_free(&m);
    drop(map);
    drop(file);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs2_free(&m) < before + 6 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "lease never ended: space not freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    m.unmount();
}

/// Free bytes of the mount, from statvfs through df's machine output.
fn fs2_free(m: &Mount) -> u64 {
    let out = Command::new("df")
        .arg("-B1")
        .arg("--output=avail")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
