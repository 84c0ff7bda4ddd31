//! Direct mapping of a pmfs file: map it, store and load through the mapping, report how
//! much of it the kernel maps with 2 MiB (PMD) and 1 GiB (PUD) pages, and the load/store
//! bandwidth (memcpy) and the rate of random 8-byte loads from distinct 4 KiB pages (the
//! TLB's part) against anonymous memory backed by 4 KiB pages and by 2 MiB pages: medians
//! of several interleaved rounds (`DAX_DEMO_ROUNDS`, default 5), for a noisy machine.
//!
//!     cargo run --release --example dax_demo -- /mnt/pm/bigfile [MiB]
//!
//! The file is created (or extended) to the given size through the file system first, by
//! fallocate, so the file system can give it 2 MiB and 1 GiB extents (a file already
//! written to that size, by dd or appends, keeps the extents its writes got). PMD mappings need the
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
    // Bandwidth: the region is stored from / loaded into a 256 MiB buffer piece by piece
    // (the buffers stay small whatever the file's size).
    let piece = len.min(256 * MIB);
    let buf = vec![0x5au8; piece];
    let mut out = vec![1u8; piece];
    let mut anon_4k = anon(len, Advice::NoHugePage);
    let mut anon_2m = anon(len, Advice::HugePage);
    // Warm the mapping (page faults are not bandwidth); the anonymous regions are filled.
    sweep_store(len, &buf, |at, b| {
        map.write(at, b)
            .unwrap_or_else(|e| panic!("write through the mapping: {e}"))
    });
    let t = Instant::now();
    map.persist(0, len).unwrap_or_else(|e| panic!("{e}"));
    let persist_secs = t.elapsed().as_secs_f64();

    // Rounds, each measuring every figure on the three kinds of memory back to back, in an
    // order that rotates: a noisy neighbour slows one round, not one kind of memory, and
    // the per-round ratios compare measurements made moments apart. Medians are reported.
    let rounds: usize = std::env::var("DAX_DEMO_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let mut figures: [[Vec<f64>; 3]; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..3 {
            let kind = (round + k) % 3;
            let (store, load, random) = match kind {
                0 => (
                    sweep_store(len, &buf, |at, b| {
                        map.write(at, b).unwrap_or_else(|e| panic!("{e}"))
                    }),
                    sweep_load(len, &mut out, |at, b| {
                        map.read(at, b).unwrap_or_else(|e| panic!("{e}"))
                    }),
                    random_rate(len, |at| {
                        let mut w = [0u8; 8];
                        map.read(at, &mut w).unwrap_or_else(|e| panic!("{e}"));
                        u64::from_le_bytes(w)
                    }),
                ),
                1 => measure_anon(&mut anon_4k, &buf, &mut out),
                _ => measure_anon(&mut anon_2m, &buf, &mut out),
            };
            for (i, v) in [store, load, random].into_iter().enumerate() {
                figures[i][kind].push(v);
            }
        }
    }
    assert_eq!(out[..4096], buf[..4096]);
    let thp = {
        let base = anon_2m.as_ptr() as usize;
        let b = backing(base, base + len);
        percent(b.pmd + b.pud, b.resident)
    };
    let base = map.as_ptr() as usize;
    let b = backing(base, base + map.len());
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
        "  medians of {rounds} interleaved rounds; ratios are medians of the per-round ratios \
         mapping / anonymous (anonymous 2 MiB pages: {thp:.0}% THP)"
    );
    for (i, (what, unit)) in [
        ("store (memcpy into)", "GB/s"),
        ("load (memcpy from) ", "GB/s"),
        ("random 8-byte loads", "M/s "),
    ]
    .into_iter()
    .enumerate()
    {
        let [dax, a4, a2] = &figures[i];
        println!(
            "  {what}: mapping {:6.2} {unit}  anon 4 KiB {:6.2} {unit} ({:.2}x)  anon 2 MiB {:6.2} {unit} ({:.2}x)",
            median(dax),
            median(a4),
            median_ratio(dax, a4),
            median(a2),
            median_ratio(dax, a2),
        );
    }
    println!("  persist({mib} MiB) {:.1} ms", persist_secs * 1e3);
}

/// Anonymous memory of `len` bytes with `advice` (4 KiB or 2 MiB pages), filled.
fn anon(len: usize, advice: Advice) -> MmapMut {
    let mut m = MmapMut::map_anon(len).unwrap_or_else(|e| panic!("anonymous map: {e}"));
    m.advise(advice)
        .unwrap_or_else(|e| panic!("madvise {advice:?}: {e}"));
    m.fill(1);
    m
}

/// Store bandwidth, load bandwidth and random-load rate of anonymous memory `m`.
fn measure_anon(m: &mut MmapMut, buf: &[u8], out: &mut [u8]) -> (f64, f64, f64) {
    let len = m.len();
    let store = sweep_store(len, buf, |at, b| m[at..at + b.len()].copy_from_slice(b));
    let load = sweep_load(len, out, |at, b| {
        let n = b.len();
        b.copy_from_slice(&m[at..at + n]);
    });
    let random = random_rate(len, |at| {
        u64::from_le_bytes(m[at..at + 8].try_into().unwrap_or_default())
    });
    (store, load, random)
}

/// Stores `buf` over `0..len` piece by piece through `store`: GB/s.
fn sweep_store(len: usize, buf: &[u8], mut store: impl FnMut(usize, &[u8])) -> f64 {
    let t = Instant::now();
    let mut at = 0;
    while at < len {
        let n = buf.len().min(len - at);
        store(at, &buf[..n]);
        at += n;
    }
    gbps(len, t.elapsed().as_secs_f64())
}

/// Loads `0..len` into `out` piece by piece through `load`: GB/s.
fn sweep_load(len: usize, out: &mut [u8], mut load: impl FnMut(usize, &mut [u8])) -> f64 {
    let t = Instant::now();
    let mut at = 0;
    while at < len {
        let n = out.len().min(len - at);
        load(at, &mut out[..n]);
        at += n;
    }
    std::hint::black_box(&out);
    gbps(len, t.elapsed().as_secs_f64())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median of `a[i] / b[i]` (measurements of the same round).
fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&ratios)
}
