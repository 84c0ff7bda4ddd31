//! The command line as a user meets it (issue 14): `pmfs layout` on closed pipes, full
//! disks and special files; the messages of the tools. Real mounts (root, /dev/fuse).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Opens wait out a lock that another test thread's fork holds a copy of until the child
/// execs (the harness forks children all the time); a real holder is still refused.
const WAIT_FOR_FORKS: pmfs::device::OpenOptions = pmfs::device::OpenOptions {
    read_only: false,
    wait_busy: Some(std::time::Duration::from_secs(10)),
};

/// Runs `cmd` to its end under a deadline (a blocked open must fail the test, not hang it).
fn run_bounded(cmd: &mut Command) -> Output {
    let mut child = cmd.stdin(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish in 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn layout(args: &[&Path], stdout: Stdio) -> Output {
    run_bounded(
        Command::new(PMFS)
            .arg("layout")
            .args(args)
            .stdout(stdout)
            .stderr(Stdio::piped()),
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn layout_ends_quietly_on_a_closed_pipe_and_fails_on_a_full_disk() {
    assert!(can_mount());
    let img = Image::new("layout-pipe", 64 * MIB);
    let m = Mount::new(&img, "");
    let file = m.path("data");
    fs::write(&file, vec![7u8; (4 * MIB) as usize]).unwrap();

    // A pipe whose reader is gone before the first write: EPIPE on every write.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = layout(&[&file], Stdio::from(writer));
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "a closed pipe is not an error to report");

    // As a user types it: more output than a pipe holds, and `head` leaving early.
    let many: Vec<String> = (0..3000).map(|_| file.display().to_string()).collect();
    let script = format!(
        "\"$0\" layout {} | head -n 1 >/dev/null; echo \"status=${{PIPESTATUS[0]}}\"",
        many.join(" ")
    );
    let out = run_bounded(
        Command::new("bash")
            .args(["-c", &script, PMFS])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "status=141");
    assert_eq!(stderr(&out), "", "no message, no backtrace");

    // A full disk: one line, failure.
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = layout(&[&file], Stdio::from(full));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "pmfs: write error on standard output: No space left on device\n"
    );

    // And the normal case still prints the extent.
    let out = layout(&[&file], Stdio::piped());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("0 "), "{text}");
    let total: u64 = text
        .lines()
        .map(|l| l.split(' ').nth(2).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 4 * MIB, "{text}");
    m.unmount();
}

#[test]
fn layout_refuses_special_files_by_name_and_reason() {
    assert!(can_mount());
    let img = Image::new("layout-special", 64 * MIB);
    let m = Mount::new(&img, "");
    let good = m.path("good");
    fs::write(&good, b"some data").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A FIFO no one writes to: opening it for reading would block forever.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo_on_pmfs = m.path("fifo");
    nix::unistd::mkfifo(
        &fifo_on_pmfs,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let elsewhere = dir.path().join("plain");
    fs::File::create(&elsewhere)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    let missing = dir.path().join("missing");

    let reason = "only regular files on a pmfs mount have a layout";
    for (path, want) in [
        (fifo.as_path(), format!("is a FIFO (named pipe): {reason}")),
        (
            fifo_on_pmfs.as_path(),
            format!("is a FIFO (named pipe): {reason}"),
        ),
        (m.mountpoint.as_path(), format!("is a directory: {reason}")),
        (
            Path::new("/dev/null"),
            format!("is a character device: {reason}"),
        ),
        (
            elsewhere.as_path(),
            "not a file on a pmfs mount".to_string(),
        ),
        (missing.as_path(), "No such file or directory".to_string()),
    ] {
        let out = layout(&[path], Stdio::piped());
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            path.display(),
            stderr(&out)
        );
        assert_eq!(stderr(&out), format!("pmfs: {}: {want}\n", path.display()));
        assert!(out.stdout.is_empty());
    }

    // Several files: the good one's block is printed, each bad one gets its line, status 1.
    let out = layout(&[&good, &m.mountpoint], Stdio::piped());
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("{}:\n", good.display())),
        "{text}"
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));

    // Usage: no file is a usage error on stderr; --help is on stdout and succeeds.
    let out = layout(&[], Stdio::piped());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("pmfs layout: no FILE given"));
    let out = layout(&[Path::new("--help")], Stdio::piped());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Usage: pmfs layout FILE..."));
    m.unmount();
}

#[test]
fn help_names_the_mount_helper_install_sh_installs() {
    let out = Command::new(PMFS).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let install = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/install.sh")).unwrap();
    assert!(
        install.contains("cat > /sbin/mount.fuse.pmfs"),
        "install.sh changed?"
    );
    assert!(
        help.contains("install.sh installs the helper /sbin/mount.fuse.pmfs"),
        "{help}"
    );
    assert!(help.contains("pmfs layout FILE..."), "{help}");
    // A help text that cannot be written is a failure, as coreutils' --help is.
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(PMFS)
        .arg("--help")
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "pmfs: write error on standard output: No space left on device\n"
    );
}

#[test]
fn a_bad_primary_superblock_is_refused_with_the_fsck_that_repairs_it() {
    let img = Image::new("badsb", 32 * MIB);
    let dir = tempfile::tempdir().unwrap();
    // Break the primary's magic; the backup (block 1) stays intact.
    let f = fs::OpenOptions::new().write(true).open(&img.path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage!", 0).unwrap();
    drop(f);
    let out = run_bounded(
        Command::new(PMFS)
            .arg(&img.path)
            .arg(dir.path())
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    assert_eq!(out.status.code(), Some(1));
    let p = img.path.display();
    assert_eq!(
        stderr(&out),
        format!(
            "pmfs: {p}: the primary superblock is damaged (not a pmfs file system (bad magic)), \
             the backup is intact: 'fsck.pmfs -y {p}' repairs the primary from it\n"
        )
    );
    // What the message promises: fsck -y restores the primary (when the workspace built it).
    let fsck = Path::new(PMFS).with_file_name("fsck-pmfs");
    if fsck.exists() {
        let st = Command::new(&fsck)
            .arg("-y")
            .arg(&img.path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(1), "fsck -y: errors corrected");
        let dev = Device::open(&img.path, &WAIT_FOR_FORKS).unwrap();
        pmfs::fs::read_superblock(&dev).unwrap();
    }

    // Both superblocks gone: not a pmfs file system, and no false promise.
    fs::write(&img.path, vec![0u8; (32 * MIB) as usize]).unwrap();
    let out = run_bounded(
        Command::new(PMFS)
            .arg(&img.path)
            .arg(dir.path())
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!("pmfs: {p}: not a pmfs file system (bad magic)\n")
    );
}

/// One of the workspace's other tools next to the pmfs binary (built by `cargo test
/// --workspace`), if it is there.
fn tool(name: &str) -> Option<std::path::PathBuf> {
    Some(Path::new(PMFS).with_file_name(name)).filter(|p| p.exists())
}

/// What `mkfs.pmfs -f -q IMG` does, through the binary when it is built.
fn mkfs_now(img: &Path) {
    match tool("mkfs-pmfs") {
        Some(bin) => {
            let out = Command::new(bin)
                .args(["-f", "-q"])
                .arg(img)
                .output()
                .unwrap();
            assert!(out.status.success(), "mkfs.pmfs -f: {}", stderr(&out));
        }
        None => {
            let dev = pmfs::cli::open_device(img, false, pmfs::cli::TOOL_WAIT, "test").unwrap();
            format(&dev, &MkfsOptions::default()).unwrap();
        }
    }
}

/// Issue 14, item 5: the daemon outlives umount(8) by a moment; mkfs, fsck and a new mount
/// started at once must wait for it instead of failing with "device is busy".
#[test]
fn umount_then_at_once_mkfs_fsck_and_mount_work() {
    assert!(can_mount());
    let img = Image::new("umount-then", 64 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("m");
    fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    struct Lazy<'a>(&'a Path);
    impl Drop for Lazy<'_> {
        fn drop(&mut self) {
            if is_mounted(self.0) {
                let _ = Command::new("umount").arg("-l").arg(self.0).status();
            }
        }
    }
    let _guard = Lazy(&mp);
    let mount = || {
        // As a user mounts: the daemon detaches.
        let out = Command::new(PMFS)
            .arg(&img.path)
            .arg(&mp)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", stderr(&out));
    };
    let umount = || {
        let out = run_retrying_busy(Command::new("umount").arg(&mp));
        assert!(out.status.success(), "umount: {}", stderr(&out));
    };
    for round in 0..4 {
        mount();
        fs::write(mp.join("f"), vec![round as u8; (8 * MIB) as usize]).unwrap();
        umount();
        mkfs_now(&img.path);

        mount();
        fs::write(mp.join("g"), b"after mkfs").unwrap();
        umount();
        if let Some(fsck) = tool("fsck-pmfs") {
            let out = Command::new(fsck)
                .arg("-fy")
                .arg(&img.path)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "fsck -fy: {}", stderr(&out));
        }

        mount();
        umount();
        // And a mount right after an umount.
        mount();
        assert_eq!(fs::read(mp.join("g")).unwrap(), b"after mkfs");
        umount();
    }
}

#[test]
fn a_held_device_is_waited_for_and_a_mounted_one_refused_at_once() {
    assert!(can_mount());
    let img = Image::new("held", 64 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("m");
    fs::create_dir(&mp).unwrap();
    // Another program (this test) holds the device for a second, unmounted.
    let held = Device::open(&img.path, &WAIT_FOR_FORKS).unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(held);
    });
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(PMFS)
        .arg(&img.path)
        .arg(&mp)
        .arg("-f")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mp = mp.canonicalize().unwrap();
    wait_until("the mount after the wait", || is_mounted(&mp));
    releaser.join().unwrap();
    // Not a terminal: the wait is silent (mkfs/tests/mkfs_output.rs sees the line on one).
    assert_eq!(fs::read_to_string(&log).unwrap(), "");

    // Mounted: a second mount is refused without waiting.
    let mp2 = dir.path().join("m2");
    fs::create_dir(&mp2).unwrap();
    let t = Instant::now();
    let out = run_bounded(
        Command::new(PMFS)
            .arg(&img.path)
            .arg(&mp2)
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        stderr(&out),
        format!(
            "pmfs: {}: device is busy: already mounted or in use\n",
            img.path.display()
        )
    );
    let out = run_retrying_busy(Command::new("umount").arg(&mp));
    assert!(out.status.success(), "umount: {}", stderr(&out));
    assert!(child.wait().unwrap().success());
}

/// Run in a private mount namespace (`unshare -m`), so that what it mounts over the system's
/// directories is seen by nothing else: puts a `pmfs` that runs the binary under test where
/// mount.fuse3's shell finds it (/usr/local/sbin), and either hides any installed
/// /sbin/mount.fuse.pmfs (so mount(8) falls back to mount.fuse3; a bind of /dev/null over it
/// is not hiding: mount(8) then runs /dev/null) or installs install.sh's helper in its
/// place; then mounts one of three ways and remounts through mount(8).
const REMOUNT_SCRIPT: &str = r#"
set -u
PMFS=$1; IMG=$2; MP=$3; HOW=$4; HELPER=$5; WORK=$6
mount -t tmpfs tmpfs /usr/local/sbin
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PMFS" > /usr/local/sbin/pmfs
chmod 755 /usr/local/sbin/pmfs
# A /usr/sbin (= /sbin) with everything it holds but mount.fuse.pmfs: none at all (mount(8)
# then falls back to mount.fuse3, even where install.sh installed one), or $HELPER.
mkdir -p "$WORK/orig" "$WORK/sbin"
mount --bind /usr/sbin "$WORK/orig"
mount -t tmpfs tmpfs "$WORK/sbin"
for f in "$WORK"/orig/*; do ln -s "$f" "$WORK/sbin/${f##*/}"; done
rm -f "$WORK/sbin/mount.fuse.pmfs"
if [ "$HELPER" != none ]; then
    cp "$HELPER" "$WORK/sbin/mount.fuse.pmfs"
    chmod 755 "$WORK/sbin/mount.fuse.pmfs"
fi
mount --bind "$WORK/sbin" /usr/sbin
trap 'umount -l "$MP" 2>/dev/null' EXIT
case $HOW in
    pmfs) "$PMFS" "$IMG" "$MP" || exit 1 ;;
    mount) mount -t fuse.pmfs "$IMG" "$MP" || exit 1 ;;
    fstab)
        printf '%s %s fuse.pmfs defaults,nofail 0 0\n' "$IMG" "$MP" > "$WORK/fstab"
        mount --bind "$WORK/fstab" /etc/fstab
        mount "$MP" || exit 1 ;;
esac
echo "type $(findmnt -n -o FSTYPE "$MP")"
mount -o remount,ro "$MP"; echo "remount,ro $?"
echo "options $(findmnt -n -o OPTIONS "$MP" | cut -d, -f1)"
if echo x 2>/dev/null > "$MP/f"; then echo "write ok"; else echo "write refused"; fi
mount -o remount,rw "$MP"; echo "remount,rw $?"
if echo x > "$MP/f"; then echo "write ok"; else echo "write refused"; fi
mount -o remount,noatime "$MP"; echo "remount,noatime $?"
findmnt -n -o OPTIONS "$MP" | tr , '\n' | grep -x noatime
umount "$MP"; echo "umount $?"
"#;

/// Issue 14, item 1: `mount -o remount,ro|rw|noatime DIR` through a real mount(8), whether
/// the mount was made by `pmfs`, by `mount -t fuse.pmfs` or from fstab, with install.sh's
/// helper installed or only mount.fuse3.
#[test]
fn mount_8_remounts_however_the_mount_was_made() {
    assert!(can_mount());
    for tool in ["unshare", "mount", "findmnt", "/sbin/mount.fuse3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(found, "this test needs {tool}");
    }
    let img = Image::new("remount", 64 * MIB);
    let work = tempfile::tempdir().unwrap();
    let mp = work.path().join("m");
    fs::create_dir(&mp).unwrap();
    // install.sh's helper, as it writes it, pointed at the binary under test.
    let install = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/install.sh")).unwrap();
    let start = install.find("<<HELPER\n").unwrap() + "<<HELPER\n".len();
    let end = start + install[start..].find("\nHELPER\n").unwrap();
    let helper_text = install[start..end]
        .replace("$prefix/sbin/pmfs", PMFS)
        .replace("\\$", "$");
    assert!(
        helper_text.contains(&format!("exec {PMFS} \"$@\"")),
        "{helper_text}"
    );
    let helper = work.path().join("mount.fuse.pmfs");
    fs::write(&helper, helper_text).unwrap();
    for how in ["pmfs", "mount", "fstab"] {
        for with in ["none", helper.to_str().unwrap()] {
            let ns = work.path().join(format!("ns-{how}-{}", with.len()));
            fs::create_dir(&ns).unwrap();
            let out = run_bounded(
                Command::new("unshare")
                    .args([
                        "-m",
                        "--propagation",
                        "private",
                        "sh",
                        "-c",
                        REMOUNT_SCRIPT,
                        "sh",
                    ])
                    .arg(PMFS)
                    .arg(&img.path)
                    .arg(&mp)
                    .arg(how)
                    .arg(with)
                    .arg(&ns)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            );
            let said = String::from_utf8_lossy(&out.stdout);
            let case = format!("mounted by {how}, helper {with}: {said}{}", stderr(&out));
            assert!(out.status.success(), "{case}");
            assert_eq!(
                said,
                "type fuse.pmfs\nremount,ro 0\noptions ro\nwrite refused\nremount,rw 0\n\
                 write ok\nremount,noatime 0\nnoatime\numount 0\n",
                "{case}"
            );
        }
    }
}

/// Issue 14, item 6: install.sh on a fresh machine (empty package lists) and its build
/// progress. Running it would change the system (it installs into /sbin), so this reads it.
#[test]
fn install_sh_updates_package_lists_and_shows_the_build() {
    let install = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/install.sh")).unwrap();
    let update = install.find("apt-get update").expect("apt-get update");
    let get = install.find("apt-get install").expect("apt-get install");
    assert!(update < get, "the update comes before the install");
    let build = install
        .lines()
        .find(|l| l.trim_start().starts_with("cargo build"))
        .expect("a cargo build line");
    assert!(
        !build.contains("--quiet") && !build.contains(" -q"),
        "{build}"
    );
    let status = Command::new("bash")
        .args(["-n", concat!(env!("CARGO_MANIFEST_DIR"), "/install.sh")])
        .status()
        .unwrap();
    assert!(status.success(), "install.sh parses");
}

/// A daemon whose mount was unmounted from outside must not unmount whatever is mounted on
/// the same directory by the time it exits. fuser 0.18's own mount did: at the session's
/// end it unmounts by path (its "still mounted?" poll of /dev/fuse reads POLLERR, the sign
/// of an unmounted connection, as mounted), so `umount DIR; pmfs OTHER DIR` lost the new
/// mount as soon as the old daemon finished exiting.
#[test]
fn an_exiting_daemon_leaves_a_newer_mount_on_its_directory_alone() {
    assert!(can_mount());
    let old_img = Image::new("old-mount", 64 * MIB);
    let new_img = Image::new("new-mount", 64 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("m");
    fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    struct Guard<'a>(&'a Path);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            while is_mounted(self.0) {
                if !Command::new("umount")
                    .arg("-l")
                    .arg(self.0)
                    .status()
                    .unwrap()
                    .success()
                {
                    break;
                }
            }
        }
    }
    let _guard = Guard(&mp);

    /// The old daemon, never left stopped or running when the test fails.
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut old = Daemon(
        Command::new(PMFS)
            .arg(&old_img.path)
            .arg(&mp)
            .arg("-f")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the first mount", || is_mounted(&mp));
    let old_pid = nix::unistd::Pid::from_raw(old.0.id() as i32);
    // Held still, the old daemon cannot exit before the new mount is there: the order that
    // a quick `umount; mount` only makes likely.
    // umount(2) itself, not umount(8), which stats the mount point and so would wait for
    // the stopped daemon.
    nix::sys::signal::kill(old_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    nix::mount::umount2(&mp, nix::mount::MntFlags::empty()).unwrap();

    let out = run_bounded(
        Command::new(PMFS)
            .arg(&new_img.path)
            .arg(&mp)
            .stderr(Stdio::piped()),
    );
    assert!(out.status.success(), "second mount: {}", stderr(&out));
    fs::write(mp.join("on-the-new-mount"), b"new").unwrap();

    nix::sys::signal::kill(old_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + MOUNT_DEADLINE;
    let status = loop {
        if let Some(s) = old.0.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            panic!("the old daemon did not exit after its unmount");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "the old daemon exited with {status}");

    let info = mountinfo::find(&mp)
        .unwrap()
        .expect("the new mount is gone");
    assert_eq!(
        Path::new(&info.source),
        new_img.path.as_path(),
        "{:?}",
        info
    );
    assert_eq!(fs::read(mp.join("on-the-new-mount")).unwrap(), b"new");
    let out = run_retrying_busy(Command::new("umount").arg(&mp));
    assert!(out.status.success(), "umount: {}", stderr(&out));
}
