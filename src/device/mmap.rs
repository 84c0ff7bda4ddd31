//! The mapped device. PLACEHOLDER: being written (see the device helper's task).

use super::{DeviceError, Media, PersistenceMode};
use std::path::Path;
use std::time::Duration;

/// How to open a device.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Map read-only (fsck -n, `-o ro`); every store returns `DeviceError::ReadOnly`.
    pub read_only: bool,
    /// Wait up to this long for another opener's exclusive lock before failing with
    /// `DeviceError::Busy` (a remount racing the old daemon's exit).
    pub wait_busy: Option<Duration>,
}

/// A device mapped into memory.
#[derive(Debug)]
pub struct Device {}

impl Device {
    pub fn open(_path: &Path, _opts: &OpenOptions) -> Result<Self, DeviceError> {
        Err(DeviceError::Unsupported { path: _path.into(), reason: "not yet".into() })
    }
}

/// Creates `path` as an image file of `size` bytes, or grows an existing one, and allocates
/// its space (fallocate) so a full file system below can never raise SIGBUS later.
pub fn create_image(_path: &Path, _size: u64) -> Result<(), DeviceError> {
    Err(DeviceError::Unsupported { path: _path.into(), reason: "not yet".into() })
}
