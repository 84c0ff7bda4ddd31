//! Mounting as root with mount(2), the way libfuse's `fuse_kern_mount` does: the daemon
//! opens /dev/fuse, mounts it with `fd=N` among the options, and serves the descriptor with
//! `fuser::Session::from_fd`, so fuser owns no mount of its own.
//!
//! Why not fuser's own `Session::new`: when its session ends, fuser 0.18 unmounts the mount
//! point *by path* unless its poll of /dev/fuse says the connection is gone, and that poll
//! takes POLLERR, which is how an unmounted connection answers, for "still mounted"
//! (fuser-0.18.0 src/mnt/mod.rs `is_mounted`). So after `umount DIR` the exiting daemon
//! unmounted DIR a second time: a mount made there in the meantime (`umount DIR; pmfs OTHER
//! DIR` lost OTHER as soon as the old daemon finished exiting), or nothing, with the warning
//! "Failed to umount filesystem: Invalid argument" at every exit.
//!
//! The rule this module keeps: the daemon unmounts only when told to (a signal), and only a
//! mount that is still its own connection ([`Connection::unmount`]).

use crate::fuse::mountinfo;
use fuser::{MountOption, SessionACL};
use nix::mount::{MntFlags, MsFlags};
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// The FUSE device every mount is a connection of.
const FUSE_DEVICE: &str = "/dev/fuse";

/// What mount(2) is given for `options`: its flags, and FUSE's own options (after the `fd=`,
/// `rootmode=`, `user_id=` and `group_id=` the caller adds). As fuser's direct mount does:
/// nodev and nosuid unless `dev`/`suid` are asked for. `None` for an option only
/// fusermount3 can apply (auto_unmount).
fn mount_arguments(options: &[MountOption], acl: SessionACL) -> Option<(MsFlags, Vec<String>)> {
    let mut flags = MsFlags::empty();
    if !options.contains(&MountOption::Dev) {
        flags |= MsFlags::MS_NODEV;
    }
    if !options.contains(&MountOption::Suid) {
        flags |= MsFlags::MS_NOSUID;
    }
    let mut data = Vec::new();
    for option in options {
        match option {
            MountOption::AutoUnmount => return None,
            MountOption::FSName(_) => {} // the mount's source, see `mount`
            MountOption::Subtype(subtype) => data.push(format!("subtype={subtype}")),
            MountOption::CUSTOM(value) => data.push(value.clone()),
            MountOption::DefaultPermissions => data.push("default_permissions".into()),
            MountOption::NoDev => flags |= MsFlags::MS_NODEV,
            MountOption::NoSuid => flags |= MsFlags::MS_NOSUID,
            MountOption::RO => flags |= MsFlags::MS_RDONLY,
            MountOption::NoExec => flags |= MsFlags::MS_NOEXEC,
            MountOption::NoAtime => flags |= MsFlags::MS_NOATIME,
            MountOption::Sync => flags |= MsFlags::MS_SYNCHRONOUS,
            MountOption::DirSync => flags |= MsFlags::MS_DIRSYNC,
            MountOption::Dev
            | MountOption::Suid
            | MountOption::RW
            | MountOption::Exec
            | MountOption::Atime
            | MountOption::Async => {}
        }
    }
    // Who besides the owner may use the mount is fuser's check in the session (SessionACL);
    // the kernel only needs to let them through.
    if acl != SessionACL::Owner {
        data.push("allow_other".into());
    }
    Some((flags, data))
}

/// True if `options` can be mounted here (rather than through fusermount3).
pub fn can_mount(options: &[MountOption]) -> bool {
    !options.contains(&MountOption::AutoUnmount)
}

/// A FUSE connection this daemon mounted.
#[derive(Debug)]
pub struct Mounted {
    /// The connection's /dev/fuse descriptor, for `Session::from_fd`.
    pub fuse: OwnedFd,
    pub connection: Connection,
}

/// Mounts /dev/fuse on `mountpoint` (canonical) with `options`, the source being the
/// `FSName` among them. Root only (mount(2) needs CAP_SYS_ADMIN). The error is one phrase.
pub fn mount(
    mountpoint: &Path,
    options: &[MountOption],
    acl: SessionACL,
) -> Result<Mounted, String> {
    let (flags, fuse_options) = mount_arguments(options, acl)
        .ok_or_else(|| "auto_unmount needs fusermount3".to_string())?;
    let source = options
        .iter()
        .find_map(|o| match o {
            MountOption::FSName(name) => Some(name.as_str()),
            _ => None,
        })
        .unwrap_or(FUSE_DEVICE);
    let root_mode = std::fs::metadata(mountpoint)
        .map_err(|e| e.to_string())?
        .mode();
    let fuse: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
        .map_err(|e| format!("{FUSE_DEVICE}: {e}"))?
        .into();
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={}",
        fuse.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    for option in &fuse_options {
        data.push(',');
        data.push_str(option);
    }
    nix::mount::mount(
        Some(source),
        mountpoint,
        Some("fuse"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| e.desc().to_string())?;
    // Read off mountinfo, which never asks the daemon (it serves nothing before INIT).
    let minor = mountinfo::find(mountpoint)
        .ok()
        .flatten()
        .filter(|m| m.fstype.starts_with("fuse"))
        .map(|m| m.minor);
    Ok(Mounted {
        fuse,
        connection: Connection {
            mountpoint: mountpoint.to_path_buf(),
            minor,
        },
    })
}

/// A FUSE connection mounted on a directory, known by its number (the minor device number
/// of its superblock, its name under /sys/fs/fuse/connections).
#[derive(Clone, Debug)]
pub struct Connection {
    pub mountpoint: PathBuf,
    /// None if mountinfo did not show the mount right after mounting (then the daemon
    /// cannot tell its mount from another and never unmounts).
    pub minor: Option<u32>,
}

impl Connection {
    /// The connection found on `mountpoint` now (for a mount fusermount3 made).
    pub fn on(mountpoint: &Path) -> Connection {
        let minor = mountinfo::find(mountpoint)
            .ok()
            .flatten()
            .filter(|m| m.fstype.starts_with("fuse"))
            .map(|m| m.minor);
        Connection {
            mountpoint: mountpoint.to_path_buf(),
            minor,
        }
    }

    /// True if the topmost mount on the mount point is still this connection.
    pub fn is_mounted(&self) -> bool {
        let Some(minor) = self.minor else {
            return false;
        };
        mountinfo::find(&self.mountpoint)
            .ok()
            .flatten()
            .is_some_and(|m| m.major == 0 && m.minor == minor && m.fstype.starts_with("fuse"))
    }

    /// Unmounts the mount point (lazily with `detach`) if it still holds this connection;
    /// a mount point that holds another mount by now, or none, is left alone (Ok). Fails
    /// with the reason, EBUSY for a busy mount without `detach`.
    ///
    /// A mount made between the check and umount(2) would still be hit: the kernel has no
    /// unmount by connection. The window is a few microseconds, against the whole exit of
    /// the daemon that fuser's unmount left open.
    pub fn unmount(&self, detach: bool) -> Result<(), nix::errno::Errno> {
        if !self.is_mounted() {
            log::info!(
                "{} no longer holds this daemon's mount: nothing to unmount",
                self.mountpoint.display()
            );
            return Ok(());
        }
        let flags = if detach {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        nix::mount::umount2(&self.mountpoint, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_options_follow_fusers_direct_mount() {
        let (flags, data) = mount_arguments(
            &[
                MountOption::FSName("/dev/pmem0".into()),
                MountOption::DefaultPermissions,
                MountOption::RO,
                MountOption::NoExec,
                MountOption::CUSTOM("subtype=pmfs".into()),
            ],
            SessionACL::All,
        )
        .unwrap();
        assert_eq!(
            flags,
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC
        );
        assert_eq!(data, ["default_permissions", "subtype=pmfs", "allow_other"]);

        let (flags, data) = mount_arguments(
            &[MountOption::Dev, MountOption::Suid, MountOption::RW],
            SessionACL::Owner,
        )
        .unwrap();
        assert_eq!(flags, MsFlags::empty());
        assert!(data.is_empty());

        assert!(mount_arguments(&[MountOption::AutoUnmount], SessionACL::All).is_none());
        assert!(!can_mount(&[MountOption::AutoUnmount]));
    }

    #[test]
    fn a_connection_never_seen_is_never_unmounted() {
        let c = Connection {
            mountpoint: PathBuf::from("/"),
            minor: None,
        };
        assert!(!c.is_mounted());
        assert_eq!(c.unmount(false), Ok(()));
    }
}
