//! Direct mapping of a pmfs file: map it, store and load through the mapping, report how
//! much of it the kernel maps with 2 MiB (PMD) and 1 GiB (PUD) pages, the load/store
//! bandwidth compared with memcpy on anonymous memory, and the rate of random 8-byte loads
//! from distinct 4 KiB pages (the TLB's part) against anonymous memory backed by 4 KiB
//! pages and by 2 MiB pages.
//!
//!     cargo run --release --example dax_demo -- /mnt/pm/bigfile [MiB]
//!
//! The file is created (or extended) to the given size through the file system first, by
//! fallocate, so the file system can give it 2 MiB and 1 GiB extents. PMD mappings need the
//! device itself to be backed by huge pages: real device-DAX, an image on a tmpfs mounted
//! with `huge=always`, or on a hugetlbfs; PUD mappings need 1 GiB pages below (device-DAX
//! with a 1 GiB alignment, or a hugetlbfs with `pagesize=1G`). bench/dax-hugepages.sh sets
//! these up.

use memmap2::{Advice, MmapMut};
use pmfs::dax::DaxMapping;
use std::fs::OpenOptions;
use std::time::Instant;

const MIB: usize = 1 << 20;

/// What /proc/self/smaps says about the VMAs inside `start..end`, in kB.
#[derive(Debug, Default)]
struct Backing {
    /// Resident: Rss, plus hugetlbfs pages (which Rss does not count).
    resident: u64,
    /// Mapped by 2 MiB entries (THP of anonymous memory, shmem or files, or 2 MiB hugetlbfs
    /// pages).
    pmd: u64,
    /// Mapped by 1 GiB entries (1 GiB hugetlbfs pages; device-DAX shows as PUD-size
    /// KernelPageSize too).
    pud: u64,
}

fn backing(start: usize, end: usize) -> Backing {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut out = Backing::default();
    let (mut inside, mut page_kb) = (false, 4);
    let kb = |l: &str| {
        l.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
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
        if line.starts_with("KernelPageSize:") {
            page_kb = kb(line);
        } else if line.starts_with("Rss:") {
            out.resident += kb(line);
        } else if line.starts_with("ShmemPmdMapped:")
            || line.starts_with("FilePmdMapped:")
            || line.starts_with("AnonHugePages:")
        {
            out.pmd += kb(line);
        } else if line.starts_with("Shared_Hugetlb:") || line.starts_with("Private_Hugetlb:") {
            let n = kb(line);
            out.resident += n;
            match page_kb {
                1_048_576 => out.pud += n,
                2048 => out.pmd += n,
                _ => {}
            }
        }
    }
    out
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Random 8-byte loads from distinct 4 KiB pages of a `len`-byte region, through `load`:
/// millions per second. Every load's address depends on the one before (a pointer chase
/// in effect), so the rate is latency, TLB misses included.
fn random_rate(len: usize, mut load: impl FnMut(usize) -> u64) -> f64 {
    const LOADS: usize = 4_000_000;
    let pages = (len / 4096) as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut sum = 0u64;
    let t = Instant::now();
    for _ in 0..LOADS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = (x ^ sum) % pages;
        sum = sum.wrapping_add(load(page as usize * 4096 + 8 * (x as usize % 512)));
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    LOADS as f64 / secs / 1e6
}

/// The random-load rate on anonymous memory of `len` bytes with `advice` (4 KiB or 2 MiB
/// pages), and the share of it in 2 MiB pages.
fn anon_rate(len: usize, advice: Advice) -> (f64, f64) {
    let mut m = MmapMut::map_anon(len).unwrap_or_else(|e| panic!("anonymous map: {e}"));
    m.advise(advice)
        .unwrap_or_else(|e| panic!("madvise {advice:?}: {e}"));
    m.fill(1);
    let base = m.as_ptr() as usize;
    let b = backing(base, base + len);
    let rate = random_rate(len, |at| {
        u64::from_le_bytes(m[at..at + 8].try_into().unwrap_or_default())
    });
    (rate, percent(b.pmd + b.pud, b.resident))
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
    if let Err(e) = nix::fcntl::fallocate(
        &file,
        nix::fcntl::FallocateFlags::empty(),
        0,
        len as libc::off_t,
    ) {
        eprintln!("dax_demo: {path}: fallocate: {}", e.desc());
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
    // Written, not zeroed: a zeroed vector is faulted in by the first load round.
    let mut out = vec![1u8; len];
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
    let b = backing(base, base + map.len());
    assert_eq!(out[..4096], buf[..4096]);
    drop((buf, out, anon));
    let dax_rate = random_rate(len, |at| {
        let mut w = [0u8; 8];
        map.read(at, &mut w).unwrap_or_else(|e| panic!("{e}"));
        u64::from_le_bytes(w)
    });
    let (rate_4k, _) = anon_rate(len, Advice::NoHugePage);
    let (rate_2m, thp) = anon_rate(len, Advice::HugePage);
    println!(
        "dax_demo: {path}: {mib} MiB mapped at {base:#x} ({})",
        map.persistence()
    );
    println!(
        "  huge-page mapping: of {} kB resident, {:.1}% PUD-mapped (1 GiB), {:.1}% PMD-mapped \
         (2 MiB); extents 2 MiB-aligned: {}",
        b.resident,
        percent(b.pud, b.resident),
        percent(b.pmd, b.resident),
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
    println!(
        "  random 8-byte loads over {mib} MiB: mapping {dax_rate:.1} M/s; anonymous 4 KiB pages \
         {rate_4k:.1} M/s ({:.2}x); anonymous 2 MiB pages {rate_2m:.1} M/s ({:.2}x, {thp:.0}% \
         THP)",
        dax_rate / rate_4k,
        dax_rate / rate_2m
    );
}
