//! Shared harness of the mount tests: formatted images in /dev/shm and `pmfs -f` mounts
//! that are always undone by a guard's Drop (fusermount3 -u, then a lazy unmount, then
//! killing the daemon, then aborting the FUSE connection if the daemon still cannot exit),
//! so a failing test never leaves a mount behind, and a hung one fails instead of hanging
//! the harness. Every wait has a deadline.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(clippy::unwrap_used)]

pub use pmfs::device::{Device, OpenOptions, create_image};
pub use pmfs::fuse::mountinfo;
pub use pmfs::mkfs::{MkfsOptions, RootDir, format, now_ns};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const PMFS: &str = env!("CARGO_BIN_EXE_pmfs");
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// How long a mount or an unmount may take before the test fails.
pub const MOUNT_DEADLINE: Duration = Duration::from_secs(30);

/// Real mounts need root and /dev/fuse. Without them the test fails rather than pass
/// having tested nothing.
pub fn can_mount() -> bool {
    assert!(
        nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists(),
        "this test mounts pmfs: it needs root and /dev/fuse"
    );
    true
}

/// A formatted image file in /dev/shm, removed on drop.
pub struct Image {
    pub path: PathBuf,
}

impl Image {
    pub fn new(name: &str, size: u64) -> Image {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = PathBuf::from(format!(
            "/dev/shm/pmfs-mount-test-{}-{}-{name}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        Self::at(path, name, size)
    }

    /// A formatted image of `size` bytes at `path` (replacing any file there), labelled
    /// `name`.
    pub fn at(path: PathBuf, name: &str, size: u64) -> Image {
        let _ = fs::remove_file(&path);
        create_image(&path, size).unwrap();
        // Another test thread forking a child at the moment create_image held the image's
        // lock leaves a copy of that lock in the child until it execs: wait it out.
        let dev = Device::open(
            &path,
            &OpenOptions {
                read_only: false,
                wait_busy: Some(Duration::from_secs(10)),
            },
        )
        .unwrap();
        format(
            &dev,
            &MkfsOptions {
                label: name.into(),
                uuid: None,
                now_ns: now_ns(),
                root: RootDir::default(),
                ..MkfsOptions::default()
            },
        )
        .unwrap();
        Image { path }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

pub fn is_mounted(dir: &Path) -> bool {
    mountinfo::find(dir)
        .unwrap()
        .is_some_and(|m| m.fstype == "fuse.pmfs" || m.fstype == "fuse")
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + MOUNT_DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mount served by a `pmfs -f` child process. Dropping it unmounts, whatever happened.
pub struct Mount {
    dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// The connection's abort switch in fusectl (`/sys/fs/fuse/connections/N/abort`).
    abort: PathBuf,
}

impl Mount {
    pub fn new(image: &Image, opts: &str) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("pmfs-mnt-")
            .tempdir()
            .unwrap();
        let mountpoint = dir.path().join("m");
        fs::create_dir(&mountpoint).unwrap();
        let mountpoint = mountpoint.canonicalize().unwrap();
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(PMFS);
        cmd.arg(&image.path).arg(&mountpoint).arg("-f");
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mount {
            dir,
            mountpoint,
            child: Some(child),
            log,
            abort: PathBuf::new(),
        };
        let deadline = Instant::now() + MOUNT_DEADLINE;
        while !is_mounted(&m.mountpoint) {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "pmfs exited with {status} before mounting: {}",
                    m.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mount timed out: {}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        m.abort = connection_abort(&m.mountpoint);
        m
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts with fusermount3 and checks that the daemon exits 0 (the file system was
    /// marked clean).
    pub fn unmount(mut self) {
        if let Err(e) = unmount_retrying_busy(&self.mountpoint) {
            panic!("fusermount3 -u failed: {e}");
        }
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + MOUNT_DEADLINE;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("pmfs did not exit after unmount: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            status.success(),
            "pmfs exited with {status}: {}",
            self.log_text()
        );
        assert!(!is_mounted(&self.mountpoint));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) && unmount_retrying_busy(&self.mountpoint).is_err() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            // A daemon thread stuck in the kernel (a notification waiting for a page lock
            // that a request to this same daemon holds) keeps the killed process from
            // exiting, and the callers waiting on the connection stay stuck: aborting the
            // connection fails every request, which frees them all.
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if child.try_wait().ok().flatten().is_none() {
                eprintln!("the killed daemon does not exit: aborting {:?}", self.abort);
                let _ = fs::write(&self.abort, "1");
            }
            let _ = child.wait();
        }
        let _ = &self.dir;
    }
}

/// The fusectl abort switch of the FUSE connection mounted on `mountpoint` (fusectl is
/// mounted if it is not). fusectl names a connection by its device number, which for FUSE's
/// anonymous devices is the minor number.
fn connection_abort(mountpoint: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let control = Path::new("/sys/fs/fuse/connections");
    if fs::read_dir(control).map_or(true, |mut d| d.next().is_none()) {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(control)
            .stderr(Stdio::null())
            .status();
    }
    let dev = fs::metadata(mountpoint).unwrap().dev();
    let name = (libc::major(dev) << 20) | libc::minor(dev);
    control.join(name.to_string()).join("abort")
}

/// Runs `cmd` until it succeeds or fails for a reason other than a busy mount, for at most
/// MOUNT_DEADLINE, and returns its last output.
///
/// Why a busy mount is retried: the tests of one binary run in parallel threads of one
/// process, and a thread that spawns a process copies the whole descriptor table into the
/// child, which holds every descriptor another test has open at that instant until its
/// exec closes them (they are all O_CLOEXEC). A file of this mount open in that window
/// makes the kernel answer an unmount, or a remount to read-only if the file was open for
/// writing, with EBUSY, though the test itself closed everything. The window lasts until
/// the child reaches exec: microseconds, or milliseconds on a loaded machine. A mount that
/// stays busy for MOUNT_DEADLINE is still a failure.
pub fn run_retrying_busy(cmd: &mut Command) -> std::process::Output {
    let deadline = Instant::now() + MOUNT_DEADLINE;
    loop {
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if out.status.success() || !busy || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts `mountpoint` with fusermount3 -u (as a user would), retrying while the mount is
/// transiently busy (see run_retrying_busy). Returns fusermount3's stderr on failure.
pub fn unmount_retrying_busy(mountpoint: &Path) -> Result<(), String> {
    let out = run_retrying_busy(Command::new("fusermount3").arg("-u").arg(mountpoint));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}
