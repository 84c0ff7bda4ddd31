//! What the three command-line tools (`pmfs`, `mkfs.pmfs`, `fsck.pmfs`) share: opening the
//! device the way a user expects right after `umount`, and a progress line on terminals.
//!
//! A pmfs mount's type is `fuse.pmfs` (plain `fuse` with nosubtype), for which the kernel
//! never sends the daemon a DESTROY nor waits for it at unmount (only `fuseblk` mounts do):
//! umount(2) returns once the connection is cut, and the daemon then notices, marks the file system
//! clean and closes the device, which takes a few milliseconds, more on a loaded machine.
//! A tool started in that window finds the device locked. So the tools wait for the lock,
//! for a bounded time, unless the device is still mounted (then waiting cannot help and the
//! refusal comes at once). A wait longer than a moment is said on stderr when it is a
//! terminal; scripts get no extra line, only the usual one-line refusal if the time runs out.

use crate::device::{Device, DeviceError, OpenOptions};
use crate::fuse::mountinfo;
use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a tool waits silently before saying that it waits: a daemon exiting after
/// umount normally lets go well within it.
pub const QUIET_WAIT: Duration = Duration::from_millis(250);

/// How long mkfs.pmfs and fsck.pmfs wait for a device another program holds.
pub const TOOL_WAIT: Duration = Duration::from_secs(5);

/// Opens `path` as [`Device::open`] does. If another program holds it and it is not
/// mounted, waits up to `wait` for it to be released; after [`QUIET_WAIT`] it says so on
/// stderr (one line prefixed with `tool`) if stderr is a terminal. A mounted device is
/// refused at once.
pub fn open_device(
    path: &Path,
    read_only: bool,
    wait: Duration,
    tool: &str,
) -> Result<Device, DeviceError> {
    let opts = |wait_busy| OpenOptions {
        read_only,
        wait_busy,
    };
    let start = Instant::now();
    match Device::open(path, &opts(None)) {
        Err(DeviceError::Busy(p)) if mounted(path) => Err(DeviceError::Busy(p)),
        Err(DeviceError::Busy(_)) => match Device::open(path, &opts(Some(QUIET_WAIT.min(wait)))) {
            Err(DeviceError::Busy(p)) => {
                let left = wait.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Err(DeviceError::Busy(p));
                }
                if std::io::stderr().is_terminal() {
                    eprintln!(
                        "{tool}: {}: in use by another program (a pmfs daemon still exiting \
                         after umount?): waiting up to {} s for it to let go",
                        path.display(),
                        wait.as_secs_f64().ceil()
                    );
                }
                Device::open(path, &opts(Some(left)))
            }
            other => other,
        },
        other => other,
    }
}

/// True if a FUSE mount's source names the file at `path` (same device and inode, or the
/// same bytes when the source cannot be resolved from here).
pub fn mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(mounts) = mountinfo::read() else {
        return false;
    };
    let me = std::fs::metadata(path).ok();
    mounts
        .iter()
        .filter(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."))
        .any(|m| {
            if m.source == path.as_os_str() {
                return true;
            }
            match (&me, std::fs::metadata(&m.source)) {
                (Some(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            }
        })
}

/// A one-line status on stderr while a long phase runs (`mkfs.pmfs: IMG: formatting | 2s`),
/// redrawn four times a second and erased at the end; only on a terminal, and only once
/// the phase has lasted [`progress_delay`], so short runs and scripts see nothing.
#[derive(Debug)]
pub struct Progress {
    state: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a phase runs before [`Progress`] shows it: 1 s, or `PMFS_PROGRESS_DELAY`
/// seconds (as git's GIT_PROGRESS_DELAY; 0 shows it at once).
pub fn progress_delay() -> Duration {
    std::env::var("PMFS_PROGRESS_DELAY")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(1), Duration::from_secs_f64)
}

impl Progress {
    /// Starts showing `label: PHASE` (see [`Progress::phase`]) on a terminal.
    pub fn start(label: String) -> Self {
        let state = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let delay = progress_delay();
        let thread = std::io::stderr().is_terminal().then(|| {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut shown = false;
                let spin = ['|', '/', '-', '\\'];
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let t = start.elapsed();
                    if t >= delay {
                        let phase = state.lock().map(|s| s.clone()).unwrap_or_default();
                        eprint!(
                            "\r{label}: {phase} {} {:.0}s \x1b[K",
                            spin[k % 4],
                            t.as_secs_f64()
                        );
                        k += 1;
                        shown = true;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                if shown {
                    eprint!("\r\x1b[K");
                }
            })
        });
        Self {
            state,
            stop,
            thread,
        }
    }

    /// What is being done now ("checking", "formatting", ...).
    pub fn phase(&self, p: &str) {
        if let Ok(mut s) = self.state.lock() {
            *s = p.to_string();
        }
    }

    /// Stops and erases the line (also on drop).
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The NUMA node sysfs gives for a `/dev/daxX.Y` (`/sys/bus/dax/devices/daxX.Y/numa_node`)
/// or `/dev/pmemN` (`/sys/block/pmemN/device/numa_node`), symlinks resolved; `None` for
/// anything else, and when sysfs says -1 (no node) or cannot be read.
pub fn sysfs_node(path: &Path) -> Option<u32> {
    let real = std::fs::canonicalize(path).ok()?;
    let name = real.strip_prefix("/dev").ok()?.to_str()?;
    let file = if name.starts_with("dax") && !name.contains('/') {
        format!("/sys/bus/dax/devices/{name}/numa_node")
    } else if name.starts_with("pmem") && !name.contains('/') {
        format!("/sys/block/{name}/device/numa_node")
    } else {
        return None;
    };
    std::fs::read_to_string(file)
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()
}

/// Puts a file system's devices together for `tool`: `first` (already opened, named `path`)
/// and the `others` named beside it, opened as [`open_device`] does
/// ([`crate::meta::devices::assemble`]). Each member's node is what sysfs says of its device
/// when it says anything (see docs/FORMAT.md, "DeviceTable"), else what mkfs recorded.
/// Errors are one line naming the device.
pub fn open_members(
    first: Arc<dyn crate::device::Media>,
    path: &Path,
    others: &[std::path::PathBuf],
    read_only: bool,
    wait: Duration,
    tool: &str,
) -> Result<crate::meta::devices::Assembled, String> {
    use crate::meta::devices::{NamedMedia, assemble};
    let mut named = vec![NamedMedia {
        name: path.to_path_buf(),
        media: first,
    }];
    for p in others {
        let d = open_device(p, read_only, wait, tool).map_err(|e| match e {
            DeviceError::Io { source, .. } => format!("{}: {source}", p.display()),
            e => format!("{}: {e}", p.display()),
        })?;
        named.push(NamedMedia {
            name: p.clone(),
            media: Arc::new(d),
        });
    }
    let mut assembled = assemble(named).map_err(|e| e.to_string())?;
    for m in &mut assembled.members {
        if let Some(node) = sysfs_node(&m.name) {
            m.node = node;
        }
    }
    Ok(assembled)
}
