//! Direct mapping of a pmfs file: map it, store and load through the mapping, report how
//! much of it the kernel maps with 2 MiB (PMD) pages and the load/store bandwidth compared
//! with memcpy on anonymous memory.
//!
//!     cargo run --release --example dax_demo -- /mnt/pm/bigfile [MiB]
//!
//! The file is created (or extended) to the given size through the file system first.
//! PMD mappings need the device itself to be backed by huge pages: real device-DAX, or an
//! image on a tmpfs mounted with `huge=always` (bench/dax-hugepages.sh sets that up).

use pmfs::dax::DaxMapping;
use std::fs::OpenOptions;
use std::time::Instant;

const MIB: usize = 1 << 20;

/// (Rss, PMD-mapped) kB of the VMAs inside `start..end`, from /proc/self/smaps.
fn pmd_share(start: usize, end: usize) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut rss, mut pmd, mut inside) = (0u64, 0u64, false);
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a >= start && b <= end;
                    continue;
                }
            }
        }
        if !inside {
            continue;
        }
        let kb = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Rss:") {
            rss += kb(line);
        } else if line.starts_with("ShmemPmdMapped:") || line.starts_with("FilePmdMapped:") {
            pmd += kb(line);
        }
    }
    (rss, pmd)
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: dax_demo FILE_ON_PMFS [MiB]");
        std::process::exit(2);
    };
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(512);
    let len = mib * MIB;
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("dax_demo: {path}: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = file.set_len(len as u64) {
        eprintln!("dax_demo: {path}: {e}");
        std::process::exit(1);
    }
    let map = match DaxMapping::map(&file, 0, len as u64) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("dax_demo: {path}: cannot map: {e}");
            std::process::exit(1);
        }
    };
    let buf = vec![0x5au8; len];
    let mut anon = vec![0u8; len];
    // Warm both sides (page faults are not bandwidth).
    map.write(0, &buf)
        .unwrap_or_else(|e| panic!("write through the mapping: {e}"));
    anon.copy_from_slice(&buf);

    let rounds = 4;
    let t = Instant::now();
    for _ in 0..rounds {
        map.write(0, &buf).unwrap_or_else(|e| panic!("{e}"));
    }
    let store = gbps(len * rounds, t.elapsed().as_secs_f64());
    let mut out = vec![0u8; len];
    let t = Instant::now();
    for _ in 0..rounds {
        map.read(0, &mut out).unwrap_or_else(|e| panic!("{e}"));
    }
    let load = gbps(len * rounds, t.elapsed().as_secs_f64());
    let t = Instant::now();
    for _ in 0..rounds {
        anon.copy_from_slice(&buf);
    }
    let anon_store = gbps(len * rounds, t.elapsed().as_secs_f64());
    let t = Instant::now();
    for _ in 0..rounds {
        out.copy_from_slice(&anon);
    }
    let anon_load = gbps(len * rounds, t.elapsed().as_secs_f64());
    let t = Instant::now();
    map.persist(0, len).unwrap_or_else(|e| panic!("{e}"));
    let persist_secs = t.elapsed().as_secs_f64();

    let base = map.as_ptr() as usize;
    let (rss, pmd) = pmd_share(base, base + map.len());
    println!(
        "dax_demo: {path}: {mib} MiB mapped at {base:#x} ({})",
        map.persistence()
    );
    println!(
        "  huge-page mapping: {pmd} of {rss} kB resident are PMD-mapped ({:.1}%); extents 2 MiB-aligned: {}",
        if rss > 0 {
            pmd as f64 * 100.0 / rss as f64
        } else {
            0.0
        },
        map.is_huge_aligned()
    );
    println!(
        "  store through mapping {store:.2} GB/s vs memcpy to anonymous memory {anon_store:.2} GB/s ({:.2}x)",
        store / anon_store
    );
    println!(
        "  load through mapping  {load:.2} GB/s vs memcpy from anonymous memory {anon_load:.2} GB/s ({:.2}x)",
        load / anon_load
    );
    println!("  persist({mib} MiB) {:.1} ms", persist_secs * 1e3);
    assert_eq!(out[..4096], buf[..4096]);
}
