//! What the three command-line tools (`pmfs`, `mkfs.pmfs`, `fsck.pmfs`) share: opening the
//! device the way a user expects right after `umount`.
//!
//! A pmfs mount's type is plain `fuse` (or `fuse.pmfs`), for which the kernel neither sends
//! the daemon a DESTROY nor waits for it at unmount (only `fuseblk` mounts do both): umount(2)
//! returns once the connection is cut, and the daemon then notices, marks the file system
//! clean and closes the device, which takes a few milliseconds, more on a loaded machine.
//! A tool started in that window finds the device locked. So the tools wait for the lock,
//! for a bounded time, unless the device is still mounted (then waiting cannot help and the
//! refusal comes at once). A wait longer than a moment is said on stderr when it is a
//! terminal; scripts get no extra line, only the usual one-line refusal if the time runs out.

use crate::device::{Device, DeviceError, OpenOptions};
use crate::fuse::mountinfo;
use std::io::IsTerminal as _;
use std::path::Path;
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
