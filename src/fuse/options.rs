//! The daemon's `-o` mount options: parsing and validation.
//!
//! Three kinds of options arrive in one comma-separated list, from the command line, from
//! fstab through mount(8) and mount.fuse3, or from `mount -o remount`:
//! - pmfs's own (`cache=`, `threads=`, the atime modes);
//! - FUSE and VFS options the daemon passes to the kernel (`ro`, `nosuid`, `allow_other`, ...);
//! - options mount(8) and fstab hand every helper that mean nothing here (`nofail`,
//!   `_netdev`, `x-*`, `defaults`, ...): accepted and ignored.
//!
//! Anything else is an error, so a typo never silently mounts with defaults.

use super::CacheMode;
use crate::fs::AtimeMode;
use std::fmt;

/// Most session threads `threads=` accepts.
pub const MAX_THREADS: usize = 64;

/// Session threads when `threads=` is absent: one per CPU, at most this many.
pub const DEFAULT_MAX_THREADS: usize = 8;

/// Longest polling window `spin=` accepts, in microseconds.
pub const MAX_SPIN_US: u64 = 100_000;

/// One option help line per entry: (syntax, meaning). `pmfs --help` prints them.
pub const HELP: &[(&str, &str)] = &[
    ("ro / rw", "mount read-only / read-write (default rw)"),
    (
        "cache=direct|page|writeback",
        "direct (default): reads and writes bypass the kernel page cache and go straight \
         to pmem (shared mmap still works, coherent with write(2)); page: ordinary \
         page-cache I/O for every open, \
         write-through; writeback: page plus the kernel's writeback cache (write(2) \
         completes in memory; data durable after fsync, msync, sync or unmount)",
    ),
    (
        "threads=N",
        "FUSE worker threads, 1..=64 (default: number of CPUs, at most 8)",
    ),
    (
        "spin=MICROSECONDS",
        "after a request, FUSE threads poll for the next one this long instead of sleeping \
         (0 = never poll; at most 100000; default auto: poll for 1000 if a ping-pong timed at \
         mount shows polling answers faster on this host)",
    ),
    (
        "relatime / noatime / strictatime",
        "when reads update atime (default relatime)",
    ),
    (
        "allow_other / allow_root",
        "let other users / root use the mount (allow_other is the default for root, and for \
         other users where /etc/fuse.conf has user_allow_other)",
    ),
    (
        "acl / noacl",
        "POSIX ACLs enforced by the kernel (default) / refused: setting or reading \
         system.posix_acl_* xattrs is EOPNOTSUPP and only the mode and umask count",
    ),
    (
        "default_permissions",
        "kernel-side permission checks (always on; accepted for compatibility)",
    ),
    (
        "auto_unmount",
        "unmount automatically if the daemon dies (through fusermount3; implies allow_other, \
         which a user other than root needs user_allow_other in /etc/fuse.conf for)",
    ),
    (
        "dev / nodev, suid / nosuid, exec / noexec",
        "the usual mount flags (default: dev,suid for root, nodev,nosuid for others)",
    ),
    ("sync / async, dirsync", "the usual mount flags"),
    (
        "norecovery",
        "with ro only: mount without recovery (a read-only mount never recovers; one that \
         needs recovery is refused)",
    ),
    (
        "remount",
        "with mount -o remount: change ro/rw and the mount flags of a mounted pmfs",
    ),
    (
        "nosubtype",
        "mount with the plain type `fuse` instead of `fuse.pmfs` (xfstests's FUSE mode \
         needs it); mount -o remount of such a mount needs -t fuse.pmfs",
    ),
    (
        "defaults, auto, noauto, user, nouser, users, nofail, _netdev, atime, diratime, \
         nodiratime, comment=..., x-...",
        "fstab options, accepted and ignored",
    ),
    (
        "user_id=, group_id=, rootmode=, max_read=, blksize=",
        "FUSE's own options, which mount(8) repeats on remount: accepted and ignored",
    ),
];

/// A bad `-o` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError(pub String);

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionError {}

/// A kernel mount flag with an on and an off spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    Dev,
    Suid,
    Exec,
    Sync,
}

/// Everything the options say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub read_only: bool,
    pub cache: CacheMode,
    /// `None`: the default (CPUs, at most [`DEFAULT_MAX_THREADS`]).
    pub threads: Option<usize>,
    pub atime: AtimeMode,
    /// `spin=`: how long session threads poll after a request (microseconds; 0 = never);
    /// `None` (absent, or `spin=auto`): poll for the default window if a calibration at
    /// mount finds that polling pays on this host ([`super::spin::Calibration`]).
    pub spin_us: Option<u64>,
    /// `Some(true)`: allow_other given; `None`: not mentioned (default depends on the user).
    pub allow_other: Option<bool>,
    pub allow_root: bool,
    pub auto_unmount: bool,
    pub remount: bool,
    /// The mount's type is `fuse.pmfs` (true, the default) or plain `fuse` (`nosubtype`).
    /// mount(8) picks the helper for `mount -o remount DIR` by that type: only `fuse.pmfs`
    /// leads it to pmfs.
    pub subtype: bool,
    /// Mount flags given explicitly, last spelling wins: (flag, on).
    pub flags: Vec<(Flag, bool)>,
    pub dirsync: bool,
    /// `norecovery` (with `ro` only, as on ext4 and XFS): a read-only mount never rolls the
    /// journal back anyway; it refuses a journal that needs recovery rather than show a
    /// half-done transaction.
    pub norecovery: bool,
    /// POSIX ACLs (`acl`, the default) or none (`noacl`).
    pub acl: bool,
    /// `device=PATH` (repeatable, as btrfs): the other devices of a file system over
    /// several devices, in any order (the mount's device is the first).
    pub devices: Vec<std::path::PathBuf>,
    /// The options as given, for error messages and logs.
    pub given: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            read_only: false,
            cache: CacheMode::Direct,
            threads: None,
            atime: AtimeMode::Relatime,
            spin_us: None,
            allow_other: None,
            allow_root: false,
            auto_unmount: false,
            remount: false,
            subtype: true,
            flags: Vec::new(),
            dirsync: false,
            norecovery: false,
            acl: true,
            devices: Vec::new(),
            given: Vec::new(),
        }
    }
}

impl Options {
    /// The value of a flag: explicit setting, else `default`.
    pub fn flag(&self, flag: Flag, default: bool) -> bool {
        self.flags
            .iter()
            .rev()
            .find(|(f, _)| *f == flag)
            .map_or(default, |&(_, on)| on)
    }

    fn set_flag(&mut self, flag: Flag, on: bool) {
        self.flags.retain(|(f, _)| *f != flag);
        self.flags.push((flag, on));
    }

    /// Parses one or more `-o` arguments (each a comma-separated list) in order; later
    /// options override earlier ones.
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<Self, OptionError> {
        let mut o = Self::default();
        for list in lists {
            for opt in list.as_ref().split(',') {
                o.apply(opt.trim())?;
            }
        }
        if o.norecovery && !o.read_only && !o.remount {
            return Err(OptionError(
                "mount option 'norecovery' needs 'ro': a read-write mount always recovers".into(),
            ));
        }
        Ok(o)
    }

    fn apply(&mut self, opt: &str) -> Result<(), OptionError> {
        if opt.is_empty() {
            return Ok(());
        }
        self.given.push(opt.to_string());
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let unknown = || OptionError(format!("unknown mount option '{opt}'"));
        let no_value = |v: Option<&str>| {
            if v.is_some() {
                Err(OptionError(format!("mount option '{key}' takes no value")))
            } else {
                Ok(())
            }
        };
        match key {
            "cache" => {
                self.cache = match value {
                    Some("direct") => CacheMode::Direct,
                    Some("page") => CacheMode::Page,
                    Some("writeback") => CacheMode::Writeback,
                    _ => {
                        return Err(OptionError(format!(
                            "bad mount option '{opt}': cache must be direct, page or writeback"
                        )));
                    }
                };
                return Ok(());
            }
            "threads" => {
                let n = value
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|n| (1..=MAX_THREADS).contains(n))
                    .ok_or_else(|| {
                        OptionError(format!(
                            "bad mount option '{opt}': threads must be 1..={MAX_THREADS}"
                        ))
                    })?;
                self.threads = Some(n);
                return Ok(());
            }
            "spin" if value == Some("auto") => {
                self.spin_us = None;
                return Ok(());
            }
            "spin" => {
                self.spin_us = value
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|n| *n <= MAX_SPIN_US)
                    .ok_or_else(|| {
                        OptionError(format!(
                            "bad mount option '{opt}': spin must be auto or 0..={MAX_SPIN_US} microseconds"
                        ))
                    })
                    .map(Some)?;
                return Ok(());
            }
            "subtype" => {
                if value != Some("pmfs") {
                    return Err(OptionError(format!(
                        "bad mount option '{opt}': the subtype is pmfs (or nosubtype for \
                         plain fuse)"
                    )));
                }
                self.subtype = true;
                return Ok(());
            }
            "device" => {
                match value {
                    Some(path) if !path.is_empty() => self.devices.push(path.into()),
                    _ => {
                        return Err(OptionError(format!(
                            "bad mount option '{opt}': device= names a device (a path)"
                        )));
                    }
                }
                return Ok(());
            }
            // Options fstab and mount(8) pass to every helper; nothing to do here.
            "comment" => return Ok(()),
            // FUSE's own superblock options: mount(8) copies them from mountinfo into the
            // option list of `mount -o remount`. The daemon sets them itself.
            "user_id" | "group_id" | "rootmode" | "max_read" | "blksize" if value.is_some() => {
                return Ok(());
            }
            k if k.starts_with("x-") => return Ok(()),
            _ => {}
        }
        no_value(value)?;
        match key {
            "ro" => self.read_only = true,
            "rw" => self.read_only = false,
            "noatime" => self.atime = AtimeMode::Noatime,
            "relatime" => self.atime = AtimeMode::Relatime,
            "strictatime" => self.atime = AtimeMode::Strictatime,
            "allow_other" => self.allow_other = Some(true),
            "allow_root" => self.allow_root = true,
            "default_permissions" => {}
            "auto_unmount" => self.auto_unmount = true,
            "remount" => self.remount = true,
            "nosubtype" => self.subtype = false,
            "dev" => self.set_flag(Flag::Dev, true),
            "nodev" => self.set_flag(Flag::Dev, false),
            "suid" => self.set_flag(Flag::Suid, true),
            "nosuid" => self.set_flag(Flag::Suid, false),
            "exec" => self.set_flag(Flag::Exec, true),
            "noexec" => self.set_flag(Flag::Exec, false),
            "sync" => self.set_flag(Flag::Sync, true),
            "async" => self.set_flag(Flag::Sync, false),
            "dirsync" => self.dirsync = true,
            "norecovery" => self.norecovery = true,
            "acl" => self.acl = true,
            "noacl" => self.acl = false,
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "nofail" | "_netdev"
            | "atime" | "diratime" | "nodiratime" => {}
            _ => return Err(unknown()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let o = Options::parse::<&str>(&[]).unwrap();
        assert_eq!(o, Options::default());
        assert!(!o.read_only);
        assert_eq!(o.cache, CacheMode::Direct);
        assert!(!o.flag(Flag::Dev, false));
    }

    #[test]
    fn other_devices() {
        let o = Options::parse(&["ro,device=/dev/dax1.0", "device=/srv/b.img"]).unwrap();
        assert_eq!(
            o.devices,
            vec![
                std::path::PathBuf::from("/dev/dax1.0"),
                std::path::PathBuf::from("/srv/b.img")
            ]
        );
        assert!(Options::parse(&["device="]).is_err());
        assert!(Options::parse(&["device"]).is_err());
    }

    #[test]
    fn norecovery_only_with_ro() {
        let o = Options::parse(&["ro,norecovery"]).unwrap();
        assert!(o.read_only && o.norecovery);
        let e = Options::parse(&["norecovery"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mount option 'norecovery' needs 'ro': a read-write mount always recovers"
        );
    }

    #[test]
    fn pmfs_options() {
        let o = Options::parse(&["ro,cache=page,threads=3,noatime"]).unwrap();
        assert!(o.read_only);
        assert_eq!(o.cache, CacheMode::Page);
        assert_eq!(o.threads, Some(3));
        assert_eq!(o.atime, AtimeMode::Noatime);
        let o = Options::parse(&["cache=writeback"]).unwrap();
        assert_eq!(o.cache, CacheMode::Writeback);
        assert!(Options::parse(&["cache=wb"]).is_err());
        let o = Options::parse(&["ro", "rw,strictatime"]).unwrap();
        assert!(!o.read_only);
        assert_eq!(o.atime, AtimeMode::Strictatime);
    }

    #[test]
    fn what_mount_fuse3_passes_is_accepted() {
        // mount.fuse3 adds dev,suid unless told otherwise; fstab brings the rest.
        let o = Options::parse(&[
            "rw,nofail,_netdev,x-systemd.automount,defaults,noauto,relatime,dev,suid",
        ])
        .unwrap();
        assert!(o.flag(Flag::Dev, false));
        assert!(o.flag(Flag::Suid, false));
        let o = Options::parse(&["nodev,dev,nodev"]).unwrap();
        assert!(!o.flag(Flag::Dev, true));
    }

    #[test]
    fn bad_options_are_errors() {
        assert_eq!(
            Options::parse(&["rw,bogus"]).unwrap_err().to_string(),
            "unknown mount option 'bogus'"
        );
        assert!(Options::parse(&["cache=fast"]).is_err());
        assert!(Options::parse(&["threads=0"]).is_err());
        assert!(Options::parse(&["threads=65"]).is_err());
        assert!(Options::parse(&["threads"]).is_err());
        assert_eq!(Options::parse(&["spin=0"]).unwrap().spin_us, Some(0));
        assert_eq!(Options::parse(&["spin=250"]).unwrap().spin_us, Some(250));
        assert_eq!(
            Options::parse(&["spin=250,spin=auto"]).unwrap().spin_us,
            None
        );
        assert_eq!(Options::default().spin_us, None);
        assert!(Options::parse(&["spin=100001"]).is_err());
        assert!(Options::parse(&["spin=-1"]).is_err());
        assert!(Options::parse(&["spin"]).is_err());
        assert!(Options::parse(&["ro=1"]).is_err());
        assert!(Options::parse(&["fsname=x"]).is_err());
    }

    #[test]
    fn remount() {
        let o = Options::parse(&["remount,ro,nosuid"]).unwrap();
        assert!(o.remount && o.read_only);
        assert!(!o.flag(Flag::Suid, true));
        // What mount(8) and mount.fuse3 pass for `mount -o remount,ro /mnt`.
        let o = Options::parse(&[
            "ro,relatime,remount,user_id=0,group_id=0,default_permissions,allow_other,dev,suid",
        ])
        .unwrap();
        assert!(o.remount && o.read_only);
    }

    #[test]
    fn acl_and_noacl() {
        assert!(Options::default().acl);
        assert!(!Options::parse(&["noacl"]).unwrap().acl);
        assert!(Options::parse(&["noacl,acl"]).unwrap().acl);
        assert!(Options::parse(&["acl=1"]).is_err());
    }

    #[test]
    fn subtype() {
        assert!(Options::default().subtype);
        assert!(!Options::parse(&["nosubtype"]).unwrap().subtype);
        assert!(Options::parse(&["nosubtype,subtype=pmfs"]).unwrap().subtype);
        assert!(Options::parse(&["subtype=ext4"]).is_err());
        assert!(Options::parse(&["subtype"]).is_err());
    }
}
