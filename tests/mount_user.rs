//! Mounts by a user other than root (issue 14, item 2): mkfs.pmfs, pmfs, fusermount3 -u and
//! fsck.pmfs run as uid 65534 (nobody) through `setpriv`, as a user would run them.
//!
//! A user's mount goes through fusermount3, which opens /dev/fuse as that user and reads
//! /etc/fuse.conf; both are the administrator's say. A distribution's fuse3 package makes
//! /dev/fuse `crw-rw-rw-`; a machine may keep it for root. So that each test meets exactly
//! the system it is about without changing the machine's own, each runs in a private mount
//! namespace (unshare) where /dev/fuse and /etc/fuse.conf are bind mounts of a device node
//! and a file the test makes. Its mounts are invisible outside, so the tests run in parallel
//! with every other mount test; a guard unmounts and ends every process of the namespace,
//! whatever happened. Needs root (to make the namespace), fusermount3 and the workspace's
//! mkfs-pmfs and fsck-pmfs (`cargo test --workspace` builds them): without them the tests
//! fail, saying which is missing.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The user the tests mount as, and another one, who must be refused by permissions.
const USER: u32 = 65534;
const OTHER: u32 = 65533;

/// The PATH of the commands run as a user.
const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How long one command may run before the test fails.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// /etc/fuse.conf as Debian ships it, with users allowed allow_other, or not.
const CONF_ALLOWING_OTHER: &str = "# test\nuser_allow_other\n";
const CONF_DEFAULT: &str = "# test\n#user_allow_other\n#mount_max = 1000\n";

/// Another of the workspace's binaries next to the pmfs binary: the test fails without it.
fn tool(name: &str) -> PathBuf {
    let p = Path::new(PMFS).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run these tests through `cargo test --workspace`, which builds it",
        p.display()
    );
    p
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A private mount namespace held open by a `sleep` child, with its own /dev/fuse and
/// /etc/fuse.conf, and a scratch directory (mode 0777, in /dev/shm) every user may use.
struct UserSystem {
    holder: Child,
    namespace: PathBuf,
    dir: tempfile::TempDir,
}

impl UserSystem {
    /// `dev_fuse_mode`: the mode of /dev/fuse in the namespace; `fuse_conf`: the text of its
    /// /etc/fuse.conf.
    fn new(dev_fuse_mode: u32, fuse_conf: &str) -> UserSystem {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests make a mount namespace for a user's mounts: they need root"
        );
        if let Err(e) = pmfs::fuse::fusermount::binary() {
            panic!("a user's mount needs fusermount3, and it is missing: {e}");
        }
        let dir = tempfile::Builder::new()
            .prefix("pmfs-user-test-")
            .tempdir_in("/dev/shm")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs the tests' mount namespace");
        let namespace = PathBuf::from(format!("/proc/{}/ns/mnt", holder.id()));
        let ours = fs::read_link("/proc/self/ns/mnt").unwrap();
        let sys = UserSystem {
            holder,
            namespace,
            dir,
        };
        // Entered by its /proc path: only once unshare(2) has made the new namespace.
        wait_until("the holder is in a namespace of its own", || {
            fs::read_link(&sys.namespace).is_ok_and(|ns| ns != ours)
        });
        // A tmpfs of the namespace's own holds the device node: the scratch directory's
        // file system may be mounted nodev.
        let etc = sys.path("etc");
        fs::create_dir(&etc).unwrap();
        sys.root(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "mode=0755,size=1m",
            "pmfs-test-etc",
        ])
        .arg(&etc)
        .succeeds();
        let node = etc.join("fuse");
        sys.root(&["mknod", "-m", &format!("{dev_fuse_mode:o}"), "--"])
            .arg(&node)
            .args(["c", "10", "229"])
            .succeeds();
        let conf = etc.join("fuse.conf");
        sys.root(&["sh", "-c", "printf %s \"$1\" > \"$2\"", "sh", fuse_conf])
            .arg(&conf)
            .succeeds();
        sys.root(&["mount", "--bind"])
            .arg(&node)
            .arg("/dev/fuse")
            .succeeds();
        sys.root(&["mount", "--bind"])
            .arg(&conf)
            .arg("/etc/fuse.conf")
            .succeeds();
        sys
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file of the holder's /proc directory.
    fn proc(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{name}", self.holder.id()))
    }

    /// A command run in the namespace as root.
    fn root(&self, argv: &[&str]) -> Cmd {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.namespace.display()))
            .arg("--")
            .args(argv);
        Cmd(c)
    }

    /// A command run in the namespace as `uid` (group `uid`, no supplementary groups).
    fn as_user(&self, uid: u32, program: impl AsRef<OsStr>) -> Cmd {
        let mut c = self.root(&[
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ]);
        // The PATH a login gives a user: root's may lead to programs under /root.
        c.0.arg(program).env("PATH", USER_PATH);
        c
    }

    /// The mount on `mp` in the namespace, if any.
    fn mount_at(&self, mp: &Path) -> Option<mountinfo::MountInfo> {
        let table = fs::read_to_string(self.proc("mountinfo")).ok()?;
        table
            .lines()
            .filter_map(mountinfo::parse_line)
            .rfind(|m| m.mount_point == mp)
    }

    /// Processes in the namespace other than its holder (the daemons the test started).
    fn processes(&self) -> Vec<i32> {
        let Ok(ns) = fs::read_link(&self.namespace) else {
            return Vec::new();
        };
        let holder = i32::try_from(self.holder.id()).unwrap_or(-1);
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != holder)
            .filter(|pid| fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|n| n == ns))
            .collect()
    }

    /// The pmfs daemon serving the namespace's mounts (there is one at a time here).
    fn daemon(&self) -> i32 {
        let pids: Vec<i32> = self
            .processes()
            .into_iter()
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "pmfs")
            })
            .collect();
        assert_eq!(pids.len(), 1, "pmfs daemons in the namespace: {pids:?}");
        pids[0]
    }
}

impl Drop for UserSystem {
    fn drop(&mut self) {
        // Whatever is still mounted under the scratch directory goes, lazily; its daemon then
        // exits by itself. Anything still running after a while is ended.
        if let Ok(table) = fs::read_to_string(self.proc("mountinfo")) {
            let mut mps: Vec<PathBuf> = table
                .lines()
                .filter_map(mountinfo::parse_line)
                .map(|m| m.mount_point)
                .filter(|mp| mp.starts_with(self.dir.path()))
                .collect();
            mps.reverse();
            for mp in mps {
                let _ = self
                    .root(&["umount", "-l", "--"])
                    .arg(&mp)
                    .0
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A command with the checks the tests make of it, each under [`COMMAND_DEADLINE`].
struct Cmd(Command);

impl Cmd {
    fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.0.arg(a);
        self
    }

    fn args<S: AsRef<OsStr>>(mut self, a: impl IntoIterator<Item = S>) -> Self {
        self.0.args(a);
        self
    }

    fn output(mut self) -> Output {
        let mut child = self
            .0
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + COMMAND_DEADLINE;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{:?} did not finish in {COMMAND_DEADLINE:?}", self.0);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    /// Runs it and checks that it succeeds: its stdout.
    fn succeeds(self) -> String {
        let shown = format!("{:?}", self.0);
        let out = self.output();
        assert!(
            out.status.success(),
            "{shown}: {}: {}",
            out.status,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs it and checks that it exits with `status`: its stderr.
    fn exits_with(self, status: i32) -> String {
        let shown = format!("{:?}", self.0);
        let out = self.output();
        assert_eq!(
            out.status.code(),
            Some(status),
            "{shown}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stderr)
    }
}

/// mkfs.pmfs as the user: an image the user owns, whose root directory the user owns.
fn user_mkfs(sys: &UserSystem, img: &Path) {
    let out = sys
        .as_user(USER, tool("mkfs-pmfs"))
        .args(["-q", "-s", "64M"])
        .arg(img)
        .output();
    assert!(out.status.success(), "mkfs.pmfs: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    assert_eq!(fs::metadata(img).unwrap().uid(), USER);
}

/// A mount point the user made.
fn user_mountpoint(sys: &UserSystem, name: &str) -> PathBuf {
    let mp = sys.path(name);
    sys.as_user(USER, "mkdir").arg(&mp).succeeds();
    mp
}

/// fsck.pmfs -fn as the user finds the file system clean (exit 0).
fn fsck_clean(sys: &UserSystem, img: &Path) {
    let out = sys
        .as_user(USER, tool("fsck-pmfs"))
        .arg("-fn")
        .arg(img)
        .output();
    assert_eq!(
        out.status.code(),
        Some(0),
        "fsck.pmfs -fn: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The whole way of a user's file system, on a system set up as a distribution sets it up
/// (/dev/fuse open to everyone, user_allow_other in /etc/fuse.conf): mkfs.pmfs as the user
/// gives a root directory the user owns; `pmfs IMG MNT` mounts through fusermount3, with
/// allow_other (others may look, the modes decide); the user's files are the user's, another
/// user is refused by their modes; `fusermount3 -u` unmounts, the daemon marks the file
/// system clean, and fsck agrees.
#[test]
fn a_user_formats_mounts_fills_and_unmounts_a_file_system_of_their_own() {
    let sys = UserSystem::new(0o666, CONF_ALLOWING_OTHER);
    let img = sys.path("user.img");
    user_mkfs(&sys, &img);
    let mp = user_mountpoint(&sys, "m");

    let err = sys.as_user(USER, PMFS).arg(&img).arg(&mp).exits_with(0);
    assert_eq!(err, "", "a user's mount says nothing when it works");
    let m = sys.mount_at(&mp).expect("mounted in the namespace");
    assert_eq!(m.fstype, "fuse.pmfs");
    assert_eq!(m.source, img.as_os_str());
    for opt in [
        format!("user_id={USER}"),
        "default_permissions".into(),
        "allow_other".into(),
    ] {
        assert!(
            m.super_options.split(',').any(|o| o == opt),
            "{opt} missing: {}",
            m.super_options
        );
    }
    assert!(m.has_mount_option("nosuid") && m.has_mount_option("nodev"));

    // The root directory is the user's, from mkfs; so is what the user makes in it.
    let root_dir = sys.root(&["stat", "-c", "%u:%g %a"]).arg(&mp).succeeds();
    assert_eq!(root_dir.trim(), format!("{USER}:{USER} 755"));
    sys.as_user(USER, "sh")
        .args([
            "-c",
            "echo mine > \"$1\"/f && chmod 600 \"$1\"/f && mkdir \"$1\"/d",
            "sh",
        ])
        .arg(&mp)
        .succeeds();
    let owners = sys
        .root(&["stat", "-c", "%n %u:%g %a"])
        .arg(mp.join("f"))
        .arg(mp.join("d"))
        .succeeds();
    assert_eq!(
        owners,
        format!(
            "{f} {USER}:{USER} 600\n{d} {USER}:{USER} 755\n",
            f = mp.join("f").display(),
            d = mp.join("d").display()
        )
    );
    assert_eq!(
        sys.as_user(USER, "cat").arg(mp.join("f")).succeeds(),
        "mine\n"
    );

    // Another user gets in (allow_other) and is refused by the modes (default_permissions).
    let listing = sys.as_user(OTHER, "ls").arg(&mp).succeeds();
    assert_eq!(listing, "d\nf\n");
    for (what, program, path) in [
        ("reading a 0600 file", "cat", mp.join("f")),
        ("creating in a 0755 directory", "touch", mp.join("theirs")),
        (
            "creating in a 0755 subdirectory",
            "mkdir",
            mp.join("d/theirs"),
        ),
    ] {
        let err = sys.as_user(OTHER, program).arg(&path).exits_with(1);
        assert!(err.contains("Permission denied"), "{what}: {err}");
    }

    sys.as_user(USER, "fusermount3")
        .arg("-u")
        .arg(&mp)
        .succeeds();
    wait_until("the daemon has exited", || sys.processes().is_empty());
    assert!(sys.mount_at(&mp).is_none());
    fsck_clean(&sys, &img);

    // FS_IOC_SHUTDOWN is root's and the mount owner's: another user is refused (EPERM),
    // the owner stops the mount (then reads fail with EIO) and can still unmount it.
    sys.as_user(USER, PMFS).arg(&img).arg(&mp).exits_with(0);
    let shutdown = "import fcntl,os,struct,sys\n\
        fd=os.open(sys.argv[1],os.O_RDONLY)\n\
        fcntl.ioctl(fd,0x8004587d,struct.pack('I',0))\n";
    let err = sys
        .as_user(OTHER, "python3")
        .args(["-c", shutdown])
        .arg(&mp)
        .exits_with(1);
    assert!(err.contains("PermissionError"), "{err}");
    assert_eq!(
        sys.as_user(USER, "cat").arg(mp.join("f")).succeeds(),
        "mine\n"
    );
    sys.as_user(USER, "python3")
        .args(["-c", shutdown])
        .arg(&mp)
        .succeeds();
    let err = sys.as_user(USER, "cat").arg(mp.join("f")).exits_with(1);
    assert!(err.contains("Input/output error"), "{err}");
    sys.as_user(USER, "fusermount3")
        .arg("-u")
        .arg(&mp)
        .succeeds();
    wait_until("the daemon has exited", || sys.processes().is_empty());

    // auto_unmount: once the daemon dies, the fusermount3 it left running takes the mount
    // away (and the next mount recovers the file system).
    sys.as_user(USER, PMFS)
        .arg(&img)
        .arg(&mp)
        .args(["-o", "auto_unmount"])
        .exits_with(0);
    assert_eq!(
        sys.as_user(USER, "cat").arg(mp.join("f")).succeeds(),
        "mine\n"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sys.daemon()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("fusermount3 has unmounted", || sys.mount_at(&mp).is_none());
    wait_until("fusermount3 has exited", || sys.processes().is_empty());
}

/// Where /etc/fuse.conf does not let users use allow_other: asking for it is refused with a
/// line that names the file, and the default mount is the user's alone (not even root gets
/// in, as FUSE has it); so is auto_unmount, which needs allow_other. SIGTERM to a user's daemon unmounts through fusermount3 and leaves a
/// clean file system. A device the user may not write is refused with the reason.
#[test]
fn without_user_allow_other_a_users_mount_is_their_own_and_sigterm_unmounts_it() {
    let sys = UserSystem::new(0o666, CONF_DEFAULT);
    let img = sys.path("user.img");
    user_mkfs(&sys, &img);
    let mp = user_mountpoint(&sys, "m");
    let shown = img.display();

    for (asked, what) in [
        ("allow_other", "a user other than root may use it"),
        ("allow_root", "a user other than root may use it"),
        (
            "auto_unmount",
            "it needs allow_other (fusermount3 must be let in to see that the mount died), \
             which a user other than root may use",
        ),
    ] {
        let err = sys
            .as_user(USER, PMFS)
            .arg(&img)
            .arg(&mp)
            .args(["-o", asked])
            .exits_with(1);
        assert_eq!(
            err,
            format!(
                "pmfs: {shown}: -o {asked}: {what} only where /etc/fuse.conf has a line \
                 'user_allow_other' (ask the administrator, or mount without it: then only \
                 you can use the mount)\n"
            )
        );
        assert!(sys.mount_at(&mp).is_none());
    }

    sys.as_user(USER, PMFS).arg(&img).arg(&mp).exits_with(0);
    let m = sys.mount_at(&mp).expect("mounted");
    assert!(
        !m.super_options.split(',').any(|o| o == "allow_other"),
        "{}",
        m.super_options
    );
    sys.as_user(USER, "touch").arg(mp.join("f")).succeeds();
    let err = sys.as_user(OTHER, "ls").arg(&mp).exits_with(2);
    assert!(err.contains("Permission denied"), "{err}");
    let err = sys.root(&["stat"]).arg(mp.join("f")).exits_with(1);
    assert!(err.contains("Permission denied"), "root: {err}");

    let daemon = sys.daemon();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("SIGTERM has unmounted", || sys.mount_at(&mp).is_none());
    wait_until("the daemon has exited", || sys.processes().is_empty());
    fsck_clean(&sys, &img);

    // An image the user may only read: one line, the reason, and the way out.
    sys.root(&["chown", "0:0"]).arg(&img).succeeds();
    sys.root(&["chmod", "0644"]).arg(&img).succeeds();
    let err = sys.as_user(USER, PMFS).arg(&img).arg(&mp).exits_with(1);
    assert_eq!(
        err,
        format!(
            "pmfs: {shown}: permission denied: the user who mounts needs read and write \
             access to it (or mount with -o ro)\n"
        )
    );
    // ... which works.
    sys.as_user(USER, PMFS)
        .arg(&img)
        .arg(&mp)
        .args(["-o", "ro"])
        .exits_with(0);
    assert!(sys.mount_at(&mp).expect("mounted").has_mount_option("ro"));
    assert_eq!(sys.as_user(USER, "ls").arg(&mp).succeeds(), "f\n");
    sys.as_user(USER, "fusermount3")
        .arg("-u")
        .arg(&mp)
        .succeeds();
    wait_until("the daemon has exited", || sys.processes().is_empty());
}

/// Where /dev/fuse is root's alone, fusermount3 cannot open it for a user either: one line
/// says so and what the administrator can do, before the device is touched.
#[test]
fn where_dev_fuse_is_roots_alone_a_user_is_told_so() {
    let sys = UserSystem::new(0o600, CONF_ALLOWING_OTHER);
    let img = sys.path("user.img");
    user_mkfs(&sys, &img);
    let before = fs::read(&img).unwrap();
    let mp = user_mountpoint(&sys, "m");
    let err = sys.as_user(USER, PMFS).arg(&img).arg(&mp).exits_with(1);
    assert_eq!(
        err,
        format!(
            "pmfs: {}: mounting as a user other than root needs read and write access to \
             /dev/fuse, which this system gives only to root (mode 0600): the administrator \
             can open it to users with 'chmod 0666 /dev/fuse', the mode the fuse3 package's \
             udev rule sets\n",
            img.display()
        )
    );
    assert!(sys.mount_at(&mp).is_none());
    assert!(fs::read(&img).unwrap() == before, "the image was changed");
}

/// Without fusermount3 a user cannot mount: one line says what to install, before the
/// device is touched. (fusermount3 is hidden in the namespace under an empty bind mount.)
#[test]
fn without_fusermount3_a_user_is_told_to_install_it() {
    let sys = UserSystem::new(0o666, CONF_ALLOWING_OTHER);
    let img = sys.path("user.img");
    user_mkfs(&sys, &img);
    let before = fs::read(&img).unwrap();
    let mp = user_mountpoint(&sys, "m");
    for dir in USER_PATH.split(':') {
        let helper = Path::new(dir).join("fusermount3");
        if helper.is_file() {
            sys.root(&["mount", "--bind", "/dev/null"])
                .arg(&helper)
                .succeeds();
        }
    }
    let err = sys.as_user(USER, PMFS).arg(&img).arg(&mp).exits_with(1);
    assert_eq!(
        err,
        format!(
            "pmfs: {}: fusermount3 is not installed (not in PATH, nor in /usr/bin, /bin, \
             /usr/local/bin): a user other than root mounts through it; install the fuse3 \
             package\n",
            img.display()
        )
    );
    assert!(sys.mount_at(&mp).is_none());
    assert!(fs::read(&img).unwrap() == before, "the image was changed");
}
