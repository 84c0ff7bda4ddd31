//! Mounting as a user other than root, the way libfuse does: the setuid-root helper
//! fusermount3 opens /dev/fuse, mounts it, and hands the descriptor back over a Unix socket
//! whose number it finds in `_FUSE_COMMFD` (SCM_RIGHTS); `fusermount3 -u` unmounts.
//!
//! fuser 0.18 goes to fusermount3 only when mount(2) fails with EPERM after fuser opened
//! /dev/fuse itself. Where /dev/fuse is root's alone (`crw------- root`, as on the machines
//! this project runs on) that open fails first, with EACCES, and fuser gives up. So the
//! daemon mounts through fusermount3 itself whenever it is not root, and serves the
//! descriptor with `fuser::Session::from_fd`.
//!
//! fusermount3 applies the usual rules to users: the mount is always nosuid,nodev (it says
//! "unsafe option ... ignored" for `suid`/`dev`), the user must be able to write to the mount
//! point, and allow_other is allowed only where /etc/fuse.conf has `user_allow_other`.

use fuser::MountOption;
use rustix::io::FdFlags;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags, SocketType,
};
use std::io::{IoSliceMut, Read as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// FUSE's configuration file, which says whether users may mount with allow_other.
pub const FUSE_CONF: &str = "/etc/fuse.conf";

const FUSERMOUNT: &str = "fusermount3";

/// Where the fuse3 package installs fusermount3, for callers whose PATH lacks it (cron jobs,
/// service units).
const FALLBACK_DIRS: &[&str] = &["/usr/bin", "/bin", "/usr/local/bin"];

/// The variable that tells fusermount3 which descriptor is the socket (libfuse's protocol).
const COMM_FD_ENV: &str = "_FUSE_COMMFD";

/// True if the text of a fuse.conf lets users mount with allow_other: a line
/// `user_allow_other`, comments (from `#`) and surrounding blanks aside.
pub fn conf_allows_other(text: &str) -> bool {
    text.lines()
        .any(|line| line.split('#').next().unwrap_or_default().trim() == "user_allow_other")
}

/// Whether /etc/fuse.conf lets users mount with allow_other. A missing file allows nothing
/// (fusermount3 then uses its defaults); an unreadable one (mode 0640 on some systems; the
/// setuid fusermount3 can still read it) is an error, for the caller to decide.
pub fn user_allow_other() -> std::io::Result<bool> {
    match std::fs::read_to_string(FUSE_CONF) {
        Ok(text) => Ok(conf_allows_other(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// fusermount3's path: from PATH, else from where the fuse3 package puts it.
pub fn binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(FUSERMOUNT))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{FUSERMOUNT} is not installed (not in PATH, nor in {}): a user other than \
                 root mounts through it; install the fuse3 package",
                FALLBACK_DIRS.join(", ")
            )
        })
}

/// One mount option as fusermount3's `-o` list spells it (fuser's own spelling is private to
/// fuser). In `fsname=` a comma or a backslash is escaped with a backslash, which
/// fusermount3 undoes, so any device path survives the comma-separated list.
pub fn option_text(option: &MountOption) -> String {
    match option {
        MountOption::FSName(name) => {
            let mut s = String::from("fsname=");
            for c in name.chars() {
                if c == ',' || c == '\\' {
                    s.push('\\');
                }
                s.push(c);
            }
            s
        }
        MountOption::Subtype(subtype) => format!("subtype={subtype}"),
        MountOption::CUSTOM(value) => value.clone(),
        MountOption::AutoUnmount => "auto_unmount".into(),
        MountOption::DefaultPermissions => "default_permissions".into(),
        MountOption::Dev => "dev".into(),
        MountOption::NoDev => "nodev".into(),
        MountOption::Suid => "suid".into(),
        MountOption::NoSuid => "nosuid".into(),
        MountOption::RO => "ro".into(),
        MountOption::RW => "rw".into(),
        MountOption::Exec => "exec".into(),
        MountOption::NoExec => "noexec".into(),
        MountOption::Atime => "atime".into(),
        MountOption::NoAtime => "noatime".into(),
        MountOption::DirSync => "dirsync".into(),
        MountOption::Sync => "sync".into(),
        MountOption::Async => "async".into(),
    }
}

/// A mount fusermount3 made.
#[derive(Debug)]
pub struct UserMount {
    /// The mount's /dev/fuse connection.
    pub fuse: OwnedFd,
    /// With auto_unmount: the socket fusermount3 keeps watching; it unmounts once the socket
    /// closes, that is when the daemon exits. Keep it open as long as the daemon serves.
    pub auto_unmount: Option<OwnedFd>,
    /// What fusermount3 said while mounting successfully ("unsafe option dev ignored"),
    /// one line each, for the caller to pass on.
    pub warnings: Vec<String>,
}

/// Mounts on `mountpoint` through fusermount3 with `options` (fusermount3's `-o` spelling,
/// see [`option_text`]). The error is one phrase: what fusermount3 said, or why it could
/// not run.
pub fn mount(mountpoint: &Path, options: &[String]) -> Result<UserMount, String> {
    let bin = binary()?;
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| format!("creating a socket for {FUSERMOUNT}: {e}"))?;
    // fusermount3's end must survive the exec. The daemon starts no other program while
    // it mounts, so no other child inherits it.
    rustix::io::fcntl_setfd(&theirs, FdFlags::empty())
        .map_err(|e| format!("passing a socket to {FUSERMOUNT}: {e}"))?;
    let mut cmd = Command::new(&bin);
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    cmd.arg("--")
        .arg(mountpoint)
        .env(COMM_FD_ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    drop(theirs);
    let received = receive_descriptor(&ours);
    let auto_unmount = options.iter().any(|o| o == "auto_unmount");
    match received {
        Ok(Some(fuse)) if auto_unmount => {
            // fusermount3 stays to unmount when `ours` closes: let a thread take what it
            // says (into the log) and its exit status, so its stderr never fills up.
            relay_in_background(child);
            Ok(UserMount {
                fuse,
                auto_unmount: Some(ours),
                warnings: Vec::new(),
            })
        }
        Ok(Some(fuse)) => {
            drop(ours);
            let (_, said) = finish(&mut child);
            Ok(UserMount {
                fuse,
                auto_unmount: None,
                warnings: said,
            })
        }
        other => {
            drop(ours);
            let (status, said) = finish(&mut child);
            Err(match (other, said.is_empty()) {
                (Err(e), true) => format!("receiving the FUSE connection from {FUSERMOUNT}: {e}"),
                (_, false) => said.join("; "),
                (Ok(_), true) => format!("{FUSERMOUNT} failed ({status}) and said nothing"),
            })
        }
    }
}

/// Unmounts `mountpoint` with `fusermount3 -u` (`-z`: lazily, even while files are open).
pub fn unmount(mountpoint: &Path, lazily: bool) -> Result<(), String> {
    let bin = binary()?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-u");
    if lazily {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let said = lines(&String::from_utf8_lossy(&out.stderr));
    Err(if said.is_empty() {
        format!("{FUSERMOUNT} -u failed ({})", out.status)
    } else {
        said.join("; ")
    })
}

/// The descriptor fusermount3 sends, or `None` if it closed the socket without one (it
/// failed, and says why on its stderr).
fn receive_descriptor(socket: &OwnedFd) -> std::io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        match got {
            Ok(_) => {
                return Ok(control.drain().find_map(|m| match m {
                    RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
                    _ => None,
                }));
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for fusermount3 to exit: its status and the lines it wrote to stderr.
fn finish(child: &mut Child) -> (String, Vec<String>) {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    let status = child
        .wait()
        .map_or_else(|e| e.to_string(), |s| s.to_string());
    (status, lines(&text))
}

/// An auto_unmount fusermount3's stderr goes to the log until it exits, in a thread that
/// also reaps it.
fn relay_in_background(mut child: Child) {
    let spawned = std::thread::Builder::new()
        .name("pmfs-fusermount".into())
        .spawn(move || {
            let (status, said) = finish(&mut child);
            for line in said {
                log::warn!("{FUSERMOUNT}: {line}");
            }
            log::debug!("{FUSERMOUNT} (auto_unmount) exited: {status}");
        });
    if let Err(e) = spawned {
        log::warn!("watching {FUSERMOUNT}: {e}");
    }
}

/// Non-empty lines of fusermount3's stderr, without its `fusermount3: ` prefix.
fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("fusermount3: ").unwrap_or(l).to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_conf_as_fusermount3_reads_it() {
        assert!(conf_allows_other("user_allow_other\n"));
        assert!(conf_allows_other(
            "# comment\n  user_allow_other  # users may\n"
        ));
        assert!(conf_allows_other("mount_max = 1000\nuser_allow_other"));
        assert!(!conf_allows_other("#user_allow_other\n"));
        assert!(!conf_allows_other("user_allow_other_not\n"));
        assert!(!conf_allows_other("no user_allow_other\n"));
        assert!(!conf_allows_other(""));
    }

    #[test]
    fn options_in_fusermount3_spelling() {
        assert_eq!(
            option_text(&MountOption::FSName("/dev/shm/a,b\\c.img".into())),
            "fsname=/dev/shm/a\\,b\\\\c.img"
        );
        assert_eq!(
            option_text(&MountOption::DefaultPermissions),
            "default_permissions"
        );
        assert_eq!(
            option_text(&MountOption::CUSTOM("subtype=pmfs".into())),
            "subtype=pmfs"
        );
        assert_eq!(option_text(&MountOption::RO), "ro");
        assert_eq!(option_text(&MountOption::NoAtime), "noatime");
    }

    #[test]
    fn fusermount3_messages_lose_their_prefix() {
        assert_eq!(
            lines("fusermount3: unsafe option dev ignored\n\nfusermount3: x\n"),
            ["unsafe option dev ignored", "x"]
        );
    }
}
