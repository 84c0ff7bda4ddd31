//! `pmfs-age`: ages a pmfs file system and reports how well large files stay in aligned
//! 2 MiB extents, for the 2 MiB-aware allocator and a naive first-fit one, side by side.
//!
//! The workload: files are written with ordinary 128 KiB writes and appends (never
//! fallocate to the final size) in a realistic mix (many small files, some medium, a few
//! large ones holding most bytes; a share of the large files grows by appends in later
//! rounds). It fills the device to 90%, then deletes and creates at random for many rounds,
//! staying near 90% full. It drives the file-system core through the same `Fs::write` calls
//! the FUSE adapter makes for each 128 KiB write(2) under `cache=direct`, so the allocator
//! sees exactly what it would see through a mount, and both policies run on identical
//! request streams (same seed).
//!
//! Reports: the share of bytes of files >= 2 MiB that sit in aligned 2 MiB extents, the
//! share of free space in whole aligned chunks and in whole free 1 GiB regions (what 1 GiB
//! extents need), bytes allocated beyond file sizes (waste),
//! and how full the device was at the first ENOSPC (after aging, the workload keeps creating
//! files until one fails).

use clap::Parser;
use pmfs::alloc::AllocPolicy;
use pmfs::device::{Device, Media, OpenOptions, create_image};
use pmfs::fs::{Ctx, Fs, MountOptions};
use pmfs::mkfs::{MkfsOptions, format};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    about = "Age a pmfs file system and report huge-page alignment (2 MiB-aware vs first fit)"
)]
struct Args {
    /// Device size in MiB (an image in /dev/shm is created and removed).
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Delete/create rounds after the initial fill.
    #[arg(long, default_value_t = 30)]
    rounds: u32,
    /// Random seed (both policies use the same one).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Image path (default: /dev/shm/pmfs-age-<pid>.img).
    #[arg(long)]
    image: Option<PathBuf>,
}

const MIB: u64 = 1 << 20;
const WRITE: usize = 128 * 1024;
const ROOT: u64 = 1;
const C: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Log-uniform in lo..hi.
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (l + u * (h - l)).exp() as u64
    }
    fn file_size(&mut self) -> u64 {
        match self.next() % 100 {
            0..70 => self.log_uniform(1024, 256 * 1024),
            70..92 => self.log_uniform(256 * 1024, 2 * MIB),
            _ => self.log_uniform(2 * MIB, 96 * MIB),
        }
    }
}

struct Stats {
    aligned_share: f64,
    free_in_chunks: f64,
    waste_mib: f64,
    first_enospc_full: Option<f64>,
    large_files: usize,
    files: usize,
    seconds: f64,
    /// Share of free space in whole free 1 GiB regions (what 1 GiB extents need).
    free_in_regions: f64,
}

fn used_fraction(fs: &Fs) -> f64 {
    let s = fs.statfs();
    1.0 - s.bfree as f64 / s.blocks as f64
}

/// Appends `len` bytes to `ino` in 128 KiB writes; Err(ENOSPC) stops.
fn append(
    fs: &Fs,
    ino: u64,
    mut off: u64,
    len: u64,
    buf: &[u8],
) -> Result<u64, pmfs::error::Error> {
    let end = off + len;
    while off < end {
        let n = ((end - off) as usize).min(WRITE);
        fs.write(&C, ino, off, &buf[..n])?;
        off += n as u64;
    }
    Ok(off)
}

fn run(args: &Args, policy: AllocPolicy) -> Result<Stats, String> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/pmfs-age-{}.img", std::process::id())));
    let _ = std::fs::remove_file(&image);
    create_image(&image, args.size_mib * MIB).map_err(|e| e.to_string())?;
    let result = (|| {
        let dev = Device::open(&image, &OpenOptions::default()).map_err(|e| e.to_string())?;
        format(&dev, &MkfsOptions::default()).map_err(|e| e.to_string())?;
        let media: Arc<dyn Media> = Arc::new(dev);
        let fs = Fs::mount(
            media,
            MountOptions {
                alloc_policy: policy,
                ..MountOptions::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let mut rng = Rng(args.seed | 1);
        let buf = vec![0xa5u8; WRITE];
        // name -> (ino, size, target size for growing files)
        let mut files: Vec<(String, u64, u64, u64)> = Vec::new();
        let mut next = 0u64;
        let mut first_enospc = None;
        let mut create =
            |fs: &Fs, files: &mut Vec<(String, u64, u64, u64)>, rng: &mut Rng| -> bool {
                let size = rng.file_size();
                // A quarter of the large files are written in two parts: half now, the rest
                // appended in a later round.
                let grows = size >= 2 * MIB && rng.next() % 4 == 0;
                let now = if grows { size / 2 } else { size };
                next += 1;
                let name = format!("f{next}");
                let Ok(a) = fs.mknod(&C, ROOT, name.as_bytes(), 0o100644, 0) else {
                    return false;
                };
                match append(fs, a.ino, 0, now, &buf) {
                    Ok(n) => {
                        files.push((name, a.ino, n, size));
                        true
                    }
                    Err(e) if e.errno() == libc::ENOSPC => {
                        let written = fs.getattr(a.ino).map(|x| x.size).unwrap_or(0);
                        files.push((name, a.ino, written, written));
                        false
                    }
                    Err(_) => false,
                }
            };
        // Fill to 90%.
        while used_fraction(&fs) < 0.90 {
            if !create(&fs, &mut files, &mut rng) {
                first_enospc.get_or_insert(used_fraction(&fs));
                break;
            }
        }
        for _ in 0..args.rounds {
            // Delete at random down to 80%, then grow some files and create new ones up to 90%.
            while used_fraction(&fs) > 0.80 && !files.is_empty() {
                let k = (rng.next() % files.len() as u64) as usize;
                let (name, ino, ..) = files.swap_remove(k);
                fs.unlink(ROOT, name.as_bytes())
                    .map_err(|e| e.to_string())?;
                fs.forget(ino, 1);
            }
            for f in files.iter_mut().filter(|f| f.2 < f.3) {
                match append(&fs, f.1, f.2, f.3 - f.2, &buf) {
                    Ok(n) => f.2 = n,
                    Err(_) => {
                        first_enospc.get_or_insert(used_fraction(&fs));
                        f.3 = f.2;
                    }
                }
            }
            while used_fraction(&fs) < 0.90 {
                if !create(&fs, &mut files, &mut rng) {
                    first_enospc.get_or_insert(used_fraction(&fs));
                    break;
                }
            }
        }
        // Measure.
        let (mut large_bytes, mut aligned_bytes, mut waste) = (0u64, 0u64, 0u64);
        let mut large_files = 0;
        for (_, ino, size, _) in &files {
            let attr = fs.getattr(*ino).map_err(|e| e.to_string())?;
            waste += (attr.blocks * 512).saturating_sub(attr.size);
            if *size < 2 * MIB {
                continue;
            }
            large_files += 1;
            large_bytes += size;
            for e in fs.layout(*ino).map_err(|e| e.to_string())? {
                // Whole 2 MiB pieces where file offset and device offset are both aligned.
                let mut off = e.file_offset.next_multiple_of(2 * MIB);
                while off + 2 * MIB <= e.file_offset + e.len {
                    let dev = e.device_offset + (off - e.file_offset);
                    if dev % (2 * MIB) == 0 {
                        aligned_bytes += (2 * MIB).min(size.saturating_sub(off));
                    }
                    off += 2 * MIB;
                }
            }
        }
        let s = fs.statfs();
        let free_bytes = s.bfree * 4096;
        let chunk_bytes = fs.allocator().free_chunks() * 2 * MIB;
        let region_bytes = fs.allocator().free_regions() * pmfs::alloc::REGION_SIZE;
        // Finally fill until the first ENOSPC: how much of the device is usable once aged.
        while first_enospc.is_none() {
            if !create(&fs, &mut files, &mut rng) {
                first_enospc = Some(used_fraction(&fs));
            }
        }
        let stats = Stats {
            aligned_share: aligned_bytes as f64 / large_bytes.max(1) as f64,
            free_in_chunks: chunk_bytes as f64 / free_bytes.max(1) as f64,
            free_in_regions: region_bytes as f64 / free_bytes.max(1) as f64,
            waste_mib: waste as f64 / MIB as f64,
            first_enospc_full: first_enospc,
            large_files,
            files: files.len(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        fs.shutdown().map_err(|e| e.to_string())?;
        Ok(stats)
    })();
    let _ = std::fs::remove_file(&image);
    result
}

fn main() {
    let args = Args::parse();
    println!(
        "pmfs aging: {} MiB device, fill to 90%, {} delete/create rounds between 80% and 90%, 128 KiB writes, seed {}",
        args.size_mib, args.rounds, args.seed
    );
    println!(
        "{:<12} {:>14} {:>16} {:>16} {:>10} {:>16} {:>8} {:>8} {:>7}",
        "policy",
        "large aligned",
        "free in chunks",
        "free in 1GiB",
        "waste",
        "first ENOSPC at",
        "files",
        "large",
        "secs"
    );
    for (name, policy) in [
        ("2MiB-aware", AllocPolicy::HugeAware),
        ("first-fit", AllocPolicy::FirstFit),
    ] {
        match run(&args, policy) {
            Ok(s) => println!(
                "{:<12} {:>13.1}% {:>15.1}% {:>15.1}% {:>6.1} MiB {:>16} {:>8} {:>8} {:>7.1}",
                name,
                s.aligned_share * 100.0,
                s.free_in_chunks * 100.0,
                s.free_in_regions * 100.0,
                s.waste_mib,
                s.first_enospc_full
                    .map_or("never".to_string(), |f| format!("{:.1}% full", f * 100.0)),
                s.files,
                s.large_files,
                s.seconds
            ),
            Err(e) => {
                eprintln!("pmfs-age: {name}: {e}");
                std::process::exit(1);
            }
        }
    }
}
