//! kill -9 of the daemon under load, many rounds.
//!
//! Each round mounts pmfs on an image in /dev/shm, runs a mixed workload from several
//! threads (creates, writes of random content, renames, unlinks, fsyncs) while recording
//! which operations returned, kills the daemon with SIGKILL at a random moment, remounts
//! (recovery runs), checks that every returned operation is there with the right content,
//! unmounts, and runs the consistency checker on the image: recovery must leave nothing to
//! fix. Needs root and /dev/fuse.
//!
//! A round also fails when its workers stopped making progress before the kill: the kill
//! waits for the next acknowledged operation after its random moment, and a daemon that
//! acknowledges nothing for 10 s is a hang, not a crash to recover from.
//!
//! `PMFS_KILL_ROUNDS` sets the number of rounds (default 50).

use pmfs::device::{Device, Media, OpenOptions, create_image};
use pmfs::mkfs::{MkfsOptions, format};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

fn unmount(mnt: &Path) {
    for _ in 0..50 {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mounted daemon; unmounts and kills on drop so a failing test leaves nothing behind.
struct Mount {
    child: Option<Child>,
    mnt: PathBuf,
}

impl Mount {
    fn start(image: &Path, mnt: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_pmfs"))
            .arg(image)
            .arg(mnt)
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pmfs");
        let m = Self {
            child: Some(child),
            mnt: mnt.to_path_buf(),
        };
        let t0 = Instant::now();
        while !is_mounted(mnt) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "pmfs did not mount within 20 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        m
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
        unmount(&self.mnt);
    }

    fn stop(&mut self) {
        unmount(&self.mnt);
        if let Some(mut c) = self.child.take() {
            let t0 = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("pmfs did not exit after unmount");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.mnt);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// xorshift64*: deterministic per-round randomness without a dependency in the hot loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What a thread knows about its own files: acknowledged contents, plus the one name an
/// operation in flight may have changed.
#[derive(Default)]
struct Model {
    files: HashMap<String, Vec<u8>>,
    in_flight: Vec<String>,
}

fn worker(
    dir: PathBuf,
    t: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> Model {
    let mut rng = Rng(seed | 1);
    let mut m = Model::default();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let pick = rng.next() % 10;
        let names: Vec<String> = m.files.keys().cloned().collect();
        if pick < 5 || names.is_empty() {
            // Create (or replace) a file with random content, sometimes fsync'd.
            let name = format!("t{t}-{}", rng.next() % 40);
            let len = (rng.next() % 300_000) as usize;
            let byte = (rng.next() & 0xff) as u8;
            let data: Vec<u8> = (0..len)
                .map(|i| byte.wrapping_add((i % 251) as u8))
                .collect();
            m.in_flight = vec![name.clone()];
            let res = (|| -> std::io::Result<()> {
                let mut f = fs::File::create(dir.join(&name))?;
                f.write_all(&data)?;
                if n % 3 == 0 {
                    f.sync_all()?;
                }
                Ok(())
            })();
            if res.is_err() {
                return m; // the daemon is gone
            }
            m.files.insert(name, data);
        } else if pick < 8 {
            let from = names[(rng.next() as usize) % names.len()].clone();
            let to = format!("t{t}-{}", rng.next() % 40);
            m.in_flight = vec![from.clone(), to.clone()];
            if fs::rename(dir.join(&from), dir.join(&to)).is_err() {
                return m;
            }
            let data = m.files.remove(&from).unwrap_or_default();
            m.files.insert(to, data);
        } else {
            let victim = names[(rng.next() as usize) % names.len()].clone();
            m.in_flight = vec![victim.clone()];
            if fs::remove_file(dir.join(&victim)).is_err() {
                return m;
            }
            m.files.remove(&victim);
        }
        m.in_flight.clear();
        acked.fetch_add(1, Ordering::Relaxed);
    }
    m
}

fn check_image(image: &Path) {
    let dev = Device::open(
        image,
        &OpenOptions {
            read_only: true,
            wait_busy: Some(Duration::from_secs(10)),
        },
    )
    .expect("open image for checking");
    let media: Arc<dyn Media> = Arc::new(dev);
    let report = pmfs::check::check(&media).expect("check");
    assert!(
        report.problems.is_empty(),
        "image inconsistent after recovery: {:#?}",
        report.problems
    );
}

#[test]
fn kill9_under_load() {
    if !Path::new("/dev/fuse").exists() || not_root() {
        panic!("this test needs root and /dev/fuse");
    }
    let rounds: usize = std::env::var("PMFS_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let image = tempfile::Builder::new()
        .prefix("pmfs-kill9-")
        .suffix(".img")
        .tempfile_in("/dev/shm")
        .expect("image");
    let image_path = image.path().to_path_buf();
    create_image(&image_path, 256 << 20).expect("create image");
    {
        let dev = Device::open(&image_path, &OpenOptions::default()).expect("open");
        format(&dev, &MkfsOptions::default()).expect("mkfs");
        dev.sync_all().expect("sync");
    }
    let mnt = tempfile::tempdir().expect("mountpoint");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut killed_with_ops = 0;
    let mut files_verified = 0usize;
    for round in 0..rounds {
        let mut m = Mount::start(&image_path, mnt.path());
        let dir = mnt.path().join(format!("round{}", round % 3));
        let _ = fs::create_dir(&dir);
        // Files left from earlier rounds in this directory belong to no model: clear them.
        for e in fs::read_dir(&dir).expect("readdir").flatten() {
            fs::remove_file(e.path()).expect("cleanup");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..3)
            .map(|t| {
                let (dir, stop, acked) = (dir.clone(), Arc::clone(&stop), Arc::clone(&acked));
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let s = seed;
                std::thread::spawn(move || worker(dir, t, s, stop, acked))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30 + seed % 300));
        // Kill only a daemon that is making progress: wait for the next acknowledgement.
        let before = acked.load(Ordering::Relaxed);
        let waited = Instant::now();
        while acked.load(Ordering::Relaxed) == before {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "round {round}: the workers acknowledged nothing for 10 s before the kill \
                 ({before} operations this round): the daemon hangs"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        m.kill9();
        stop.store(true, Ordering::Relaxed);
        let models: Vec<Model> = workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect();
        // Remount: recovery runs; every acknowledged operation must be there.
        let mut m = Mount::start(&image_path, mnt.path());
        let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
        for e in fs::read_dir(&dir).expect("readdir after crash").flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            seen.insert(name, fs::read(e.path()).expect("read after crash"));
        }
        for model in &models {
            killed_with_ops += usize::from(!model.files.is_empty());
            for (name, data) in &model.files {
                if model.in_flight.contains(name) {
                    continue;
                }
                let got = seen
                    .get(name)
                    .unwrap_or_else(|| panic!("round {round}: acknowledged file {name} lost"));
                files_verified += 1;
                assert!(
                    got == data,
                    "round {round}: {name}: content differs ({} vs {} bytes)",
                    got.len(),
                    data.len()
                );
            }
            for name in seen.keys() {
                let mine = name.starts_with(&format!(
                    "t{}-",
                    models
                        .iter()
                        .position(|x| std::ptr::eq(x, model))
                        .unwrap_or(0)
                ));
                if mine && !model.files.contains_key(name) && !model.in_flight.contains(name) {
                    panic!(
                        "round {round}: {name} exists but was never acknowledged (or was unlinked)"
                    );
                }
            }
        }
        m.stop();
        check_image(&image_path);
    }
    eprintln!(
        "kill -9: {rounds} rounds, {killed_with_ops} thread histories, {files_verified} acknowledged files verified"
    );
    assert!(
        files_verified > rounds,
        "the workload acknowledged almost nothing"
    );
}

/// True when not running as root (geteuid through /proc, to keep this test free of unsafe).
fn not_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) != Some("0"))
        })
        .unwrap_or(true)
}
