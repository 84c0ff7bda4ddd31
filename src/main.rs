//! `pmfs DEVICE MOUNTPOINT [-o OPTIONS] [-f] [-d]`: the mount daemon.
//!
//! Lifecycle:
//! 1. Parse and check everything that can be checked without the device (usage errors exit 2).
//! 2. Unless `-f`: start a copy of this program in a new session (`--daemon-child`) with its
//!    stdout on a pipe, and wait. The copy mounts; once the mount answers requests it writes
//!    `ready` and detaches its stdio. The parent then exits 0; if the pipe closes without
//!    `ready`, the parent exits with the child's status, after the child printed its one-line
//!    error on the shared stderr. Re-executing rather than forking keeps the daemon free of
//!    any fork-after-threads hazard, with no raw fork call.
//! 3. Mount: open the device exclusively (waiting up to 10 s for a previous daemon of the same
//!    device to let go), `Fs::mount`, then mount and complete the INIT handshake in this
//!    thread, before any worker thread exists: as root with mount(2) (`pmfs::fuse::kernel_mount`,
//!    not fuser's own mount, which unmounts by path at exit); as any other user, or with
//!    auto_unmount, through fusermount3, as libfuse does (`pmfs::fuse::fusermount`); either
//!    way the descriptor goes to `fuser::Session::from_fd`.
//! 4. Serve with N worker threads. SIGTERM/SIGINT/SIGHUP unmount (lazily if busy) if the
//!    mount point still holds this daemon's mount; an unmount from outside (`umount`,
//!    `fusermount3 -u`) ends the session the same way, and the daemon then unmounts nothing. Either
//!    way `Filesystem::destroy` marks the file system clean, and the exit status says whether
//!    that worked.
//!
//! Exit status: 0 success, 1 failure, 2 usage.
//!
//! Through mount(8): `mount -t fuse.pmfs DEVICE MOUNTPOINT` runs `/sbin/mount.fuse.pmfs` if it
//! exists, else `mount.fuse3`, which runs `pmfs DEVICE MOUNTPOINT -o OPTIONS` through
//! `/bin/sh`, so `pmfs` must be in the PATH of whoever calls mount(8) (e.g. /usr/local/bin or
//! /usr/sbin; systemd's mount units use the standard PATH). This binary also understands the
//! helper calling convention itself (`-t TYPE`, `-n`, `-s`, `-v`), so a symlink
//! `/sbin/mount.fuse.pmfs -> pmfs` works as well.

use clap::{CommandFactory, FromArgMatches, Parser};
use fuser::{Config, MountOption, Session, SessionACL};
use nix::mount::MsFlags;
use nix::sys::signal::{SigSet, Signal};
use pmfs::device::Media;
use pmfs::fs::{Fs, MountOptions};
use pmfs::fuse::fusermount::{self, FUSE_CONF};
use pmfs::fuse::kernel_mount;
use pmfs::fuse::mountinfo::{self, MountInfo};
use pmfs::fuse::options::{self, DEFAULT_MAX_THREADS, Flag, Options};
use pmfs::fuse::{CacheMode, PmfsFuse};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long to wait for a previous daemon to release the device (a mount right after
/// umount; see `pmfs::cli`). A device that is still mounted is refused at once.
const WAIT_BUSY: Duration = Duration::from_secs(10);

/// The line the daemon child writes to its stdout once the mount serves requests.
const READY: &str = "ready";

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "pmfs",
    version,
    about = "Mount a pmfs file system (persistent memory, served through FUSE)",
    long_about = "Mount the pmfs file system on DEVICE (a /dev/daxN.M or /dev/pmemN device, or \
                  an image file made by mkfs.pmfs) at MOUNTPOINT. The daemon detaches once the \
                  mount is ready; unmount with umount(8) or fusermount3 -u."
)]
struct Cli {
    /// The device or image file holding the file system.
    device: PathBuf,
    /// An existing directory to mount on.
    mountpoint: PathBuf,
    /// Mount options, comma-separated; may be repeated (see OPTIONS below).
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Stay in the foreground (log to stderr).
    #[arg(short = 'f')]
    foreground: bool,
    /// Debug logging (stderr with -f, else syslog); implies nothing else.
    #[arg(short = 'd')]
    debug: bool,
    /// mount(8) helper convention: the file system type (must be fuse.pmfs).
    #[arg(short = 't', value_name = "TYPE", hide = true)]
    fstype: Option<String>,
    /// mount(8) helper convention: do not write /etc/mtab (there is none to write).
    #[arg(short = 'n', hide = true)]
    no_mtab: bool,
    /// mount(8) helper convention: sloppy option parsing (ignored: unknown options are errors).
    #[arg(short = 's', hide = true)]
    sloppy: bool,
    /// mount(8) helper convention: verbose.
    #[arg(short = 'v', hide = true)]
    verbose: bool,
    /// Internal: the detached daemon started by a pmfs without -f.
    #[arg(long = "daemon-child", hide = true)]
    daemon_child: bool,
}

/// A failure, printed as one line `pmfs: DEVICE: reason`.
struct Failure(String);

fn options_help() -> String {
    let mut s = String::from("Mount options (-o):\n");
    for (syntax, meaning) in options::HELP {
        let _ = writeln!(s, "  {syntax}\n      {meaning}");
    }
    s.push_str(
        "\nmount(8) and /etc/fstab: install.sh installs the helper /sbin/mount.fuse.pmfs, which \
         mount(8) runs for `mount -t fuse.pmfs DEVICE MOUNTPOINT` and for fstab lines of type \
         fuse.pmfs; it runs `pmfs DEVICE MOUNTPOINT -o OPTIONS`. (Without that helper, \
         mount(8) falls back to mount.fuse3, which finds pmfs by PATH.)\n\
         \n\
         As a user other than root, pmfs mounts through fusermount3 (package fuse3), as \
         libfuse does; unmount with fusermount3 -u MOUNTPOINT. allow_other then needs \
         user_allow_other in /etc/fuse.conf.\n\
         \n\
         pmfs layout FILE...: print where a file's extents lie on the device \
         (`pmfs layout --help`).\n\
         \n\
         Exit status: 0 success, 1 failure, 2 usage error.",
    );
    s
}

fn main() -> ExitCode {
    // `pmfs layout FILE...`: a subcommand that cannot clash with a device named "layout"
    // in practice (mount needs a mount point too, and layout's arguments are pmfs files).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "layout") {
        return layout(&args[2..]);
    }
    let parsed = Cli::command()
        .after_help(options_help())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            // `pmfs --help > /dev/full` fails as coreutils' --help does.
            return match e.print().and_then(|()| std::io::stdout().flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => output_failed(&err),
            };
        }
    };
    let opts = match Options::parse(&cli.options) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pmfs: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(t) = &cli.fstype {
        if !matches!(t.as_str(), "fuse.pmfs" | "pmfs") {
            eprintln!("pmfs: file system type '{t}' is not fuse.pmfs");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let _ = (cli.no_mtab, cli.sloppy);
    let result = if opts.remount {
        init_logging(&cli, false);
        remount(&cli, &opts)
    } else if cli.foreground || cli.daemon_child {
        init_logging(&cli, cli.daemon_child);
        serve(&cli, &opts)
    } else {
        return spawn_daemon();
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            let dev = cli.device.display().to_string();
            if msg.starts_with(&dev) {
                eprintln!("pmfs: {msg}");
            } else {
                eprintln!("pmfs: {dev}: {msg}");
            }
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Foreground: env_logger on stderr (warnings, or debug with -d; RUST_LOG overrides).
/// Detached: syslog (info, or debug with -d), or nothing if there is no syslog socket.
/// Readahead of a `cache=page` mount, in KiB: one largest FUSE request (`max_pages` of
/// 256 pages by default). The kernel starts a FUSE mount at its block-device default of 128
/// KiB, which INIT can lower but not raise, so sequential page-cache reads cost eight
/// requests per MiB instead of one (bench/RESULTS.md).
const PAGE_CACHE_READ_AHEAD_KB: u32 = 1024;

/// Raises the mount's readahead (its bdi is named after the FUSE connection, `0:minor`).
/// Needs root; without it the kernel default stays, which is slower but correct.
fn set_read_ahead(minor: u32) {
    let path = format!("/sys/class/bdi/0:{minor}/read_ahead_kb");
    match std::fs::write(&path, PAGE_CACHE_READ_AHEAD_KB.to_string()) {
        Ok(()) => log::debug!("{path}: {PAGE_CACHE_READ_AHEAD_KB}"),
        Err(e) => {
            log::info!("readahead stays at the kernel default ({path}: {e}; raising it needs root)")
        }
    }
}

fn init_logging(cli: &Cli, detached: bool) {
    let level = if cli.debug || cli.verbose {
        log::LevelFilter::Debug
    } else if detached {
        log::LevelFilter::Info
    } else {
        log::LevelFilter::Warn
    };
    if detached {
        let formatter = syslog::Formatter3164 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: "pmfs".into(),
            pid: std::process::id(),
        };
        if let Ok(logger) = syslog::unix(formatter) {
            if log::set_boxed_logger(Box::new(syslog::BasicLogger::new(logger))).is_ok() {
                log::set_max_level(level);
            }
        }
    } else {
        let env = env_logger::Env::default().default_filter_or(level.as_str());
        let _ = env_logger::Builder::from_env(env).try_init();
    }
}

/// The parent of a daemonised mount: runs the daemon child and reports its outcome.
fn spawn_daemon() -> ExitCode {
    let fail = |msg: String| {
        eprintln!("pmfs: {msg}");
        ExitCode::from(EXIT_FAILURE)
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find my own executable: {e}")),
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut child = match Command::new(exe)
        .args(args)
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the daemon: {e}")),
    };
    let ready = child.stdout.take().is_some_and(|out| {
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).is_ok() && line.trim_end() == READY
    });
    if ready {
        return ExitCode::SUCCESS;
    }
    match child.wait() {
        Ok(status) => match status.code() {
            Some(0) | None => ExitCode::from(EXIT_FAILURE),
            Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(EXIT_FAILURE)),
        },
        Err(e) => fail(format!("waiting for the daemon: {e}")),
    }
}

/// The mount point as the kernel will show it, checked to be a directory.
fn mount_point(cli: &Cli) -> Result<PathBuf, Failure> {
    let mp = &cli.mountpoint;
    let canon = mp
        .canonicalize()
        .map_err(|e| Failure(format!("mount point {}: {e}", mp.display())))?;
    if !canon.is_dir() {
        return Err(Failure(format!(
            "mount point {}: not a directory",
            mp.display()
        )));
    }
    Ok(canon)
}

/// Mounts and serves until unmounted: the foreground daemon and the detached child.
fn serve(cli: &Cli, opts: &Options) -> Result<(), Failure> {
    if cli.daemon_child {
        // A session of our own: no controlling terminal, no signals from the parent's.
        let _ = nix::unistd::setsid();
    }
    // Signals are taken synchronously by one thread (below); block them before any thread
    // exists so every thread inherits the mask.
    let signals = termination_signals();
    signals
        .thread_block()
        .map_err(|e| Failure(format!("blocking signals: {e}")))?;

    let mountpoint = mount_point(cli)?;
    let fsname = cli
        .device
        .to_str()
        .ok_or_else(|| Failure("the device path must be valid UTF-8".into()))?
        .to_string();
    // Only root mounts with mount(2) itself: FUSE needs CAP_SYS_ADMIN for that, and
    // /dev/fuse may be root's alone. Everyone else goes through fusermount3. Whatever can
    // refuse the mount is checked before the device is opened.
    let root = nix::unistd::geteuid().is_root();
    if !root {
        fusermount::binary().map_err(Failure)?;
        fuse_device_for_user()?;
    }
    let config = session_config(&fsname, opts, root)?;
    let device = pmfs::cli::open_device(&cli.device, opts.read_only, WAIT_BUSY, "pmfs")
        .map_err(|e| Failure(open_error(&cli.device, opts.read_only, &e)))?;
    if device.is_sparse() && !opts.read_only {
        let note = format!(
            "{}: sparse image: its space is allocated as pmfs uses it, so writes fail with \
             ENOSPC once the file system holding it is full (whatever df says of pmfs)",
            cli.device.display()
        );
        // Said once, in the log (stderr in the foreground, syslog once detached): a mount
        // that works prints nothing, as mount(8) and scripts that compare output expect.
        log::warn!("{note}");
    }
    let assembled = pmfs::cli::open_members(
        Arc::new(device),
        &cli.device,
        &opts.devices,
        opts.read_only,
        WAIT_BUSY,
        "pmfs",
    )
    .map_err(Failure)?;
    let media = assembled.media;
    let fs = Fs::mount(
        Arc::clone(&media),
        MountOptions {
            read_only: opts.read_only,
            atime: opts.atime,
            member_nodes: assembled.members.iter().map(|m| m.node).collect(),
            ..MountOptions::default()
        },
    )
    .map_err(|e| Failure(mount_error(&cli.device, media.as_ref(), &e)))?;
    drop(media);
    // The preload library's published leases: their state table lives in shared memory,
    // readable by whoever may open the device (created at the first such lease).
    fs.enable_published_leases(
        PathBuf::from(format!("/dev/shm/pmfs-direct.{}", std::process::id())),
        Some(&cli.device),
    );

    let threads = config.n_threads.unwrap_or(1);
    let mut fuse = PmfsFuse::new(fs, opts.cache);
    fuse.set_acls(opts.acl);
    // spin=N polls for N µs, spin=0 never; without it (spin=auto) a calibration in the
    // background decides (pmfs::fuse::spin's module comment).
    let poller = match opts.spin_us {
        Some(0) => None,
        Some(us) => Some(fuse.poll_for(Duration::from_micros(us), threads)),
        None => {
            let poller = fuse.poll_for(pmfs::fuse::spin::DEFAULT_WINDOW, threads);
            poller.poll_if_calibration_says_so();
            Some(poller)
        }
    };
    let clean = fuse.clean_flag();
    let notifier = fuse.notifier_slot();
    // Root mounts with mount(2) itself (kernel_mount's module comment says why not through
    // fuser), except for auto_unmount, which only fusermount3 provides.
    let (session, unmounter, _auto_unmount) =
        if root && kernel_mount::can_mount(&config.mount_options) {
            let mounted = kernel_mount::mount(&mountpoint, &config.mount_options, config.acl)
                .map_err(|e| Failure(format!("mounting on {}: {e}", mountpoint.display())))?;
            let connection = mounted.connection;
            let session = Session::from_fd(fuse, mounted.fuse, config.acl, config.clone())
                .map_err(|e| {
                    // Mounted, but no daemon will serve it: take the mount away again.
                    let _ = connection.unmount(true);
                    Failure(format!(
                        "starting the FUSE session on {}: {e}",
                        mountpoint.display()
                    ))
                })?;
            (session, Unmounter::Kernel(connection), None)
        } else {
            let options: Vec<String> = fusermount_options(&config);
            let mounted = fusermount::mount(&mountpoint, &options).map_err(|e| {
                Failure(format!(
                    "mounting on {} through fusermount3: {e}",
                    mountpoint.display()
                ))
            })?;
            for said in &mounted.warnings {
                eprintln!("pmfs: {}: fusermount3: {said}", cli.device.display());
            }
            let session = Session::from_fd(fuse, mounted.fuse, config.acl, config.clone())
                .map_err(|e| {
                    // Mounted, but no daemon will serve it: take the mount away again.
                    let _ = fusermount::unmount(&mountpoint, true);
                    Failure(format!(
                        "starting the FUSE session on {}: {e}",
                        mountpoint.display()
                    ))
                })?;
            let connection = kernel_mount::Connection::on(&mountpoint);
            (
                session,
                Unmounter::Fusermount(connection),
                mounted.auto_unmount,
            )
        };
    // Before the workers start: handlers may need it to invalidate cached attributes.
    let _ = notifier.set(session.notifier());
    if let Some(poller) = &poller {
        // Not fatal: without it the session threads just sleep between requests.
        if let Err(e) = poller.attach(session.as_fd()) {
            log::warn!("polling /dev/fuse is off: {e}");
        }
    }
    // Our FUSE connection's number, for aborting a busy lazy unmount and for read-ahead.
    let conn = unmounter.connection().minor;
    if matches!(opts.cache, CacheMode::Page | CacheMode::Writeback) {
        if let Some(minor) = conn {
            set_read_ahead(minor);
        }
    }
    log::info!(
        "mounted {} on {} (cache={}, {} threads{})",
        cli.device.display(),
        mountpoint.display(),
        opts.cache.name(),
        threads,
        if opts.read_only { ", read-only" } else { "" }
    );

    {
        let mountpoint = mountpoint.clone();
        std::thread::Builder::new()
            .name("pmfs-signals".into())
            .spawn(move || signal_loop(&signals, &unmounter, &mountpoint, conn))
            .map_err(|e| Failure(format!("starting the signal thread: {e}")))?;
    }

    if cli.daemon_child {
        detach()?;
    }

    let run = session.run();
    let was_clean = clean.load(Ordering::SeqCst);
    match run {
        Ok(()) if was_clean => {
            log::info!("unmounted {}", mountpoint.display());
            Ok(())
        }
        Ok(()) => Err(Failure(
            "unmounted, but marking the file system clean failed (see the log); \
             the next mount recovers"
                .into(),
        )),
        Err(e) => Err(Failure(format!("FUSE session failed: {e}"))),
    }
}

/// Why the mount failed, as one line. A damaged primary superblock next to an intact
/// backup is what `fsck.pmfs -y` repairs: say so, as e2fsck's "try a backup superblock" does.
fn mount_error(device: &Path, media: &dyn Media, e: &pmfs::error::Error) -> String {
    let primary = pmfs::fs::read_superblock(media);
    match (primary, pmfs::fs::read_backup_superblock(media)) {
        (Err(bad), Ok(_)) => format!(
            "the primary superblock is damaged ({bad}), the backup is intact: \
             'fsck.pmfs -y {}' repairs the primary from it",
            device.display()
        ),
        _ => match e {
            pmfs::error::Error::Device(pmfs::device::DeviceError::NoSpace(_)) => format!(
                "{e}: the metadata and the blocks in use cannot be backed; free space there, \
                 or mount read-only (-o ro)"
            ),
            _ => e.to_string(),
        },
    }
}

/// Why the device cannot be opened, as one phrase. Permission is the one a user meets:
/// the daemon opens the device as the user who runs it.
fn open_error(device: &Path, read_only: bool, e: &pmfs::device::DeviceError) -> String {
    match e {
        pmfs::device::DeviceError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            let access = if read_only {
                "read access to it"
            } else {
                "read and write access to it (or mount with -o ro)"
            };
            format!(
                "{}: permission denied: the user who mounts needs {access}",
                device.display()
            )
        }
        other => other.to_string(),
    }
}

/// fusermount3 opens /dev/fuse as the user it mounts for (the device's mode is the
/// administrator's say over who may use FUSE), as the clones of the session's workers do.
/// Where only root may open it, say so in terms a user can act on, not as fusermount3's bare
/// "Permission denied".
fn fuse_device_for_user() -> Result<(), Failure> {
    const DEV_FUSE: &str = "/dev/fuse";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(DEV_FUSE)
                .map(|m| format!(" (mode {:04o})", m.permissions().mode() & 0o7777))
                .unwrap_or_default();
            Err(Failure(format!(
                "mounting as a user other than root needs read and write access to \
                 {DEV_FUSE}, which this system gives only to root{mode}: the administrator \
                 can open it to users with 'chmod 0666 {DEV_FUSE}', the mode the fuse3 \
                 package's udev rule sets"
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Failure(format!(
            "{DEV_FUSE} does not exist: the kernel's FUSE module is not loaded \
             (modprobe fuse, as root)"
        ))),
        Err(e) => Err(Failure(format!("{DEV_FUSE}: {}", os_reason(&e)))),
    }
}

/// Who may use the mount besides its owner. allow_other is the default for root, as with
/// kernel file systems (default_permissions, always on, still checks every access against
/// the modes), and for other users where /etc/fuse.conf allows them allow_other
/// (`user_allow_other`); where it does not, a user's mount is the user's alone, and what
/// needs allow_other is refused with the reason rather than dropped: allow_other,
/// allow_root (allow_other to the kernel, narrowed by fuser), and auto_unmount, since
/// fusermount3 unmounts a dead mount only if it may look at it (it opens the mount point,
/// as root, and unmounts on ENOTCONN; without allow_other FUSE answers EACCES).
fn session_acl(opts: &Options, root: bool) -> Result<SessionACL, Failure> {
    let users_may = if root {
        Ok(true)
    } else {
        fusermount::user_allow_other()
    };
    let asked = [
        (opts.allow_other == Some(true), "allow_other"),
        (opts.allow_root, "allow_root"),
        (opts.auto_unmount, "auto_unmount"),
    ]
    .into_iter()
    .find_map(|(given, name)| given.then_some(name));
    let other = match (users_may, asked) {
        // allow_root alone narrows the default to root (and the owner).
        (Ok(true), _) => opts.allow_other.unwrap_or(!opts.allow_root),
        (Ok(false), Some(which)) => {
            let what = if which == "auto_unmount" {
                "it needs allow_other (fusermount3 must be let in to see that the mount died), \
                 which a user other than root may use"
            } else {
                "a user other than root may use it"
            };
            return Err(Failure(format!(
                "-o {which}: {what} only where {FUSE_CONF} has a line 'user_allow_other' (ask \
                 the administrator, or mount without it: then only you can use the mount)"
            )));
        }
        (Ok(false), None) => false,
        // Unreadable: fusermount3, which can read it, decides on what was asked for;
        // nothing more is asked for by default.
        (Err(e), _) => {
            log::info!("{FUSE_CONF}: {e}: allow_other only if asked for");
            opts.allow_other == Some(true)
        }
    };
    Ok(if other || (opts.auto_unmount && !opts.allow_root) {
        SessionACL::All
    } else if opts.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    })
}

/// The fuser session configuration for `opts`, mounted by root (`root`) or by another user.
fn session_config(fsname: &str, opts: &Options, root: bool) -> Result<Config, Failure> {
    let mut mo = vec![
        // The mount source is the device path byte for byte, so `findmnt -S DEVICE` and
        // `umount DEVICE` find the mount.
        MountOption::FSName(fsname.to_string()),
        MountOption::DefaultPermissions,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // fuser mounts nodev,nosuid unless dev/suid are given. Root gets mount(8)'s defaults,
    // dev,suid, as with any file system (and as mount.fuse3 passes them), unless it says
    // nodev/nosuid; other users get nodev,nosuid.
    if opts.flag(Flag::Dev, root) {
        mo.push(MountOption::Dev);
    }
    if opts.flag(Flag::Suid, root) {
        mo.push(MountOption::Suid);
    }
    if !opts.flag(Flag::Exec, true) {
        mo.push(MountOption::NoExec);
    }
    if opts.flag(Flag::Sync, false) {
        mo.push(MountOption::Sync);
    }
    if opts.dirsync {
        mo.push(MountOption::DirSync);
    }
    if opts.atime == pmfs::fs::AtimeMode::Noatime {
        mo.push(MountOption::NoAtime);
    }
    if opts.auto_unmount {
        mo.push(MountOption::AutoUnmount);
    }
    // The type `fuse.pmfs`: mount(8) chooses the helper for `mount -o remount DIR` by the
    // type mountinfo shows, and only this one leads it to /sbin/mount.fuse.pmfs (or to
    // mount.fuse3 -t fuse.pmfs, which runs pmfs); for plain `fuse` it runs mount.fuse3, which
    // would execute the source (the device path) as a program. It goes as a kernel option,
    // which FUSE parses itself, for both kinds of mount (fusermount3 passes it on). `nosubtype` keeps plain `fuse` for
    // xfstests's FUSE mode, which compares df -T's type column with `fuse`.
    if opts.subtype {
        mo.push(MountOption::CUSTOM("subtype=pmfs".into()));
    }
    let mut config = Config::default();
    config.mount_options = mo;
    config.acl = session_acl(opts, root)?;
    config.n_threads = Some(opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(DEFAULT_MAX_THREADS)
    }));
    // One /dev/fuse file per worker (FUSE_DEV_IOC_CLONE): less contention on the queue lock.
    // A clone opens /dev/fuse anew, which a user's daemon may do too (checked before).
    config.clone_fd = true;
    Ok(config)
}

/// The options of `config` as fusermount3 takes them: the mount options, and allow_other
/// when anyone but the owner may use the mount (fuser restricts allow_root to root itself).
fn fusermount_options(config: &Config) -> Vec<String> {
    let mut options: Vec<String> = config
        .mount_options
        .iter()
        .map(fusermount::option_text)
        .collect();
    if config.acl != SessionACL::Owner {
        options.push("allow_other".into());
    }
    options
}

/// How the signal thread unmounts: with umount(2) for a mount made with mount(2) (root),
/// through fusermount3 for one it made. Either way only while the mount point still holds
/// this daemon's connection: after an unmount from outside it may hold a newer mount.
#[derive(Debug)]
enum Unmounter {
    Kernel(kernel_mount::Connection),
    Fusermount(kernel_mount::Connection),
}

impl Unmounter {
    fn connection(&self) -> &kernel_mount::Connection {
        match self {
            Self::Kernel(c) | Self::Fusermount(c) => c,
        }
    }

    /// Unmounts, lazily with `detach` (the mount leaves the tree now and lives on until its
    /// last open file closes); fails while the mount is busy without `detach`.
    fn unmount(&self, detach: bool) -> Result<(), String> {
        match self {
            Self::Kernel(c) => c.unmount(detach).map_err(|e| e.desc().to_string()),
            Self::Fusermount(c) if c.is_mounted() => fusermount::unmount(&c.mountpoint, detach),
            Self::Fusermount(_) => Ok(()),
        }
    }
}

/// Tells the waiting parent that the mount is ready, then lets go of its stdio so nothing
/// that captured the parent's output waits for the daemon, and of its working directory so
/// it never keeps a file system busy.
fn detach() -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure(format!("telling the parent we are ready: {e}")))?;
    drop(out);
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Failure(format!("/dev/null: {e}")))?;
    let redirect = nix::unistd::dup2_stdin(&null)
        .and_then(|()| nix::unistd::dup2_stdout(&null))
        .and_then(|()| nix::unistd::dup2_stderr(&null));
    if let Err(e) = redirect {
        log::warn!("detaching stdio: {e}");
    }
    let _ = std::env::set_current_dir("/");
    Ok(())
}

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Waits for SIGTERM/SIGINT/SIGHUP and unmounts. The session then ends in the main thread
/// (destroy marks the file system clean). A second signal while a lazy unmount waits for
/// open files exits at once, leaving the file system to the next mount's recovery.
fn signal_loop(signals: &SigSet, unmounter: &Unmounter, mountpoint: &Path, conn: Option<u32>) {
    let first = AtomicBool::new(true);
    loop {
        let sig = match signals.wait() {
            Ok(s) => s,
            Err(e) => {
                log::error!("waiting for signals: {e}");
                return;
            }
        };
        if !first.swap(false, Ordering::SeqCst) {
            log::warn!("{sig:?} again: exiting without a clean unmount");
            std::process::exit(i32::from(EXIT_FAILURE));
        }
        log::info!("{sig:?}: unmounting {}", mountpoint.display());
        match unmounter.unmount(false) {
            Ok(()) => continue,
            Err(e) => log::warn!("unmount {}: {e}; detaching lazily", mountpoint.display()),
        }
        if let Err(e) = unmounter.unmount(true) {
            log::warn!("lazy unmount {}: {e}", mountpoint.display());
        }
        // The lazily detached mount lives until its last open file closes. Abort the FUSE
        // connection so the session ends now (open files then fail with ENOTCONN), when the
        // fusectl file system is there to do it.
        let abort = conn.map(|c| PathBuf::from(format!("/sys/fs/fuse/connections/{c}/abort")));
        match abort {
            Some(p) if p.exists() => {
                if let Err(e) = std::fs::write(&p, "1") {
                    log::warn!("{}: {e}", p.display());
                }
            }
            _ => log::warn!(
                "{} is busy: serving it until its last open file is closed (signal again to exit now)",
                mountpoint.display()
            ),
        }
    }
}

/// `mount -o remount,...`: mount(8) calls the helper for remounts of fuse.pmfs too, with the
/// mount's current options from mountinfo plus the new ones (`ro,relatime,remount,user_id=0,
/// ...`), and mount.fuse3 adds `dev,suid` unless `nodev`/`nosuid` are among them.
///
/// FUSE accepts `MS_REMOUNT` through the classic mount(2) call: the VFS applies the mount
/// flags (nosuid, nodev, noexec, atime modes) and the superblock's read-only flag itself, and
/// FUSE ignores the data options. So the helper makes that call, starting from the mount's
/// current flags so that a remount naming only `ro` changes only that. The daemon is not
/// told and needs not be: after `remount,ro` the kernel refuses every change with EROFS before
/// it reaches the daemon (the daemon still updates atime on reads: mount noatime to avoid even
/// that), and `remount,rw` lifts that again. A daemon started with `-o ro` opened the device
/// read-only, so on a mount remounted rw its answer to every change stays EROFS: unmount and
/// mount again to write.
fn remount(cli: &Cli, opts: &Options) -> Result<(), Failure> {
    let mountpoint = mount_point(cli)?;
    let m: MountInfo = mountinfo::find(&mountpoint)
        .map_err(|e| Failure(format!("/proc/self/mountinfo: {e}")))?
        .filter(|m| m.fstype == "fuse" || m.fstype == "fuse.pmfs")
        .ok_or_else(|| Failure(format!("{} is not a pmfs mount", mountpoint.display())))?;
    let read_only = opts.given.iter().rev().find_map(|o| match o.as_str() {
        "ro" => Some(true),
        "rw" => Some(false),
        _ => None,
    });
    let read_only = read_only.unwrap_or_else(|| m.has_mount_option("ro"));
    let mut flags = MsFlags::MS_REMOUNT;
    let current = |o: &str| m.has_mount_option(o);
    let set = |flags: &mut MsFlags, on: bool, f: MsFlags| flags.set(f, on);
    set(&mut flags, read_only, MsFlags::MS_RDONLY);
    set(
        &mut flags,
        !opts.flag(Flag::Suid, !current("nosuid")),
        MsFlags::MS_NOSUID,
    );
    set(
        &mut flags,
        !opts.flag(Flag::Dev, !current("nodev")),
        MsFlags::MS_NODEV,
    );
    set(
        &mut flags,
        !opts.flag(Flag::Exec, !current("noexec")),
        MsFlags::MS_NOEXEC,
    );
    set(
        &mut flags,
        opts.flag(Flag::Sync, current("sync")),
        MsFlags::MS_SYNCHRONOUS,
    );
    set(
        &mut flags,
        opts.dirsync || current("dirsync"),
        MsFlags::MS_DIRSYNC,
    );
    let atime_given = opts
        .given
        .iter()
        .any(|o| matches!(o.as_str(), "noatime" | "relatime" | "strictatime"));
    let atime = if atime_given {
        opts.atime
    } else if current("noatime") {
        pmfs::fs::AtimeMode::Noatime
    } else if current("strictatime") || !current("relatime") {
        pmfs::fs::AtimeMode::Strictatime
    } else {
        pmfs::fs::AtimeMode::Relatime
    };
    flags |= match atime {
        pmfs::fs::AtimeMode::Noatime => MsFlags::MS_NOATIME,
        pmfs::fs::AtimeMode::Relatime => MsFlags::MS_RELATIME,
        pmfs::fs::AtimeMode::Strictatime => MsFlags::MS_STRICTATIME,
    };
    if atime_given && atime != pmfs::fs::AtimeMode::Noatime {
        log::info!("the daemon keeps the atime mode it was mounted with");
    }
    nix::mount::mount(None::<&str>, &mountpoint, None::<&str>, flags, None::<&str>).map_err(
        |e| match e {
            nix::errno::Errno::EPERM if !nix::unistd::geteuid().is_root() => Failure(format!(
                "remount {}: only root can change the flags of a mount (unmount with \
                 fusermount3 -u and mount again with the new options)",
                mountpoint.display()
            )),
            e => Failure(format!("remount {}: {e}", mountpoint.display())),
        },
    )?;
    Ok(())
}

/// `pmfs layout FILE...`: one line per extent, `FILE_OFFSET DEVICE_OFFSET LENGTH FLAGS`,
/// byte counts in decimal, FLAGS `unwritten` or `-` (FS_IOC_FIEMAP does not pass through
/// FUSE, so this asks the daemon with pmfs's own ioctl).
///
/// It behaves as the coreutils do with their output and their arguments: a reader that
/// goes away (`| head`) ends it quietly with the status of a SIGPIPE death (141, as the shell
/// shows it), any other failed write (`> /dev/full`) is one line and status 1, and anything
/// but a regular file is refused from its `stat`, without opening it for I/O (a FIFO would
/// block the open; a device would be opened by its driver).
fn layout(files: &[std::ffi::OsString]) -> ExitCode {
    const HELP: &str = "Usage: pmfs layout FILE...\n\nPrints each extent of a file on a pmfs \
        mount, one line per extent:\n  FILE_OFFSET DEVICE_OFFSET LENGTH FLAGS\nin bytes \
        (decimal); FLAGS is `unwritten` for preallocated space, `-` otherwise. With several \
        files, each block starts with `FILE:`. Only regular files on a pmfs mount have a \
        layout.\n\nExit status: 0 success, 1 a file had no layout to show or the output \
        could not be written, 2 usage error.\n";
    if files.iter().any(|f| f == "-h" || f == "--help") {
        let mut out = std::io::stdout().lock();
        return match out.write_all(HELP.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => output_failed(&e),
        };
    }
    if files.is_empty() {
        eprint!("pmfs layout: no FILE given\n\n{HELP}");
        return ExitCode::from(EXIT_USAGE);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut status = ExitCode::SUCCESS;
    for f in files {
        let path = Path::new(f);
        let written = match extents_of(path) {
            Ok(entries) => (|| -> std::io::Result<()> {
                if files.len() > 1 {
                    writeln!(out, "{}:", path.display())?;
                }
                for e in entries {
                    let flags = if e.flags & pmfs::dax::ENTRY_UNWRITTEN != 0 {
                        "unwritten"
                    } else {
                        "-"
                    };
                    writeln!(
                        out,
                        "{} {} {} {flags}",
                        e.file_offset, e.device_offset, e.len
                    )?;
                }
                Ok(())
            })(),
            Err(why) => {
                // What was printed so far comes first, as it would unbuffered.
                let flushed = out.flush();
                eprintln!("pmfs: {}: {why}", path.display());
                status = ExitCode::FAILURE;
                flushed
            }
        };
        if let Err(e) = written {
            return output_failed(&e);
        }
    }
    match out.flush() {
        Ok(()) => status,
        Err(e) => output_failed(&e),
    }
}

/// The extents of `path`, or why it has none to show (one phrase, no errno number).
fn extents_of(path: &Path) -> Result<Vec<pmfs::dax::MapEntry>, String> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
    let md = std::fs::metadata(path).map_err(|e| os_reason(&e))?;
    let ft = md.file_type();
    let kind = if ft.is_file() {
        None
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_block_device() {
        Some("a block device")
    } else if ft.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    };
    if let Some(kind) = kind {
        return Err(format!(
            "is {kind}: only regular files on a pmfs mount have a layout"
        ));
    }
    // O_NONBLOCK: should the path be swapped for a FIFO after the stat, the open does not
    // wait for a writer; the fstat below then refuses it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| os_reason(&e))?;
    let now = file.metadata().map_err(|e| os_reason(&e))?;
    if !now.is_file() || now.ino() != md.ino() || now.dev() != md.dev() {
        return Err("changed while it was opened: try again".into());
    }
    match pmfs::dax::query(&file, 0, 0, u64::MAX >> 1) {
        Ok((_, entries)) => Ok(entries),
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
            Err("not a file on a pmfs mount".into())
        }
        Err(e) => Err(os_reason(&e)),
    }
}

/// An I/O error as a phrase, "No such file or directory", without Rust's "(os error 2)".
fn os_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// A write to stdout failed. A closed pipe is the reader's choice (`| head`): end quietly
/// with the status a SIGPIPE death shows in the shell, as coreutils do. Anything else (a
/// full disk, `> /dev/full`) is one line and a failure.
fn output_failed(e: &std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return ExitCode::from(128 + libc::SIGPIPE as u8);
    }
    eprintln!("pmfs: write error on standard output: {}", os_reason(e));
    ExitCode::FAILURE
}
