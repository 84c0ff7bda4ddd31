//! Fills a formatted pmfs image with N empty files (directories of 1,000) through the core,
//! without mounting: how the mount-time and memory figures for a 1M-file file system are
//! prepared (a million creates through FUSE would take minutes).
//!
//!     cargo run --release --example populate -- IMAGE [N]

use pmfs::device::{Device, Media, OpenOptions};
use pmfs::fs::{Ctx, Fs, MountOptions};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(image) = args.next() else {
        eprintln!("usage: populate IMAGE [N]");
        std::process::exit(2);
    };
    let n: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let run = || -> Result<(), String> {
        let dev =
            Device::open(image.as_ref(), &OpenOptions::default()).map_err(|e| e.to_string())?;
        let media: Arc<dyn Media> = Arc::new(dev);
        let fs = Fs::mount(media, MountOptions::default()).map_err(|e| e.to_string())?;
        let c = Ctx::ROOT;
        let t = Instant::now();
        let mut dir = 0;
        for i in 0..n {
            if i % 1000 == 0 {
                let d = fs
                    .mkdir(&c, 1, format!("d{}", i / 1000).as_bytes(), 0o755)
                    .map_err(|e| e.to_string())?;
                dir = d.ino;
            }
            let a = fs
                .mknod(&c, dir, format!("f{i}").as_bytes(), 0o100644, 0)
                .map_err(|e| e.to_string())?;
            fs.forget(a.ino, 1);
        }
        fs.shutdown().map_err(|e| e.to_string())?;
        println!("populate: {n} files in {:.1} s", t.elapsed().as_secs_f64());
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("populate: {image}: {e}");
        std::process::exit(1);
    }
}
