//! mkfs.pmfs's output as a user meets it (issue 14): a report that cannot be written is a
//! failure with one line (`> /dev/full`), a reader that leaves early ends it quietly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Opens wait out a lock that another test thread's fork holds a copy of until the child
/// execs (the harness forks children all the time); a real holder is still refused.
const WAIT_FOR_FORKS: pmfs::device::OpenOptions = pmfs::device::OpenOptions {
    read_only: false,
    wait_busy: Some(std::time::Duration::from_secs(10)),
};

const BIN: &str = env!("CARGO_BIN_EXE_mkfs-pmfs");

struct ImageFile(PathBuf);

impl Drop for ImageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where test images go: /dev/shm, or the temp dir without it.
fn scratch_dir() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

fn image_path(name: &str) -> ImageFile {
    let path = scratch_dir().join(format!("pmfs-mkfs-out-{}-{name}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    ImageFile(path)
}

fn mkfs(args: &[&str], stdout: Stdio) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn dev_full() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
}

#[test]
fn a_report_that_cannot_be_written_fails_with_one_line() {
    let img = image_path("full");
    let p = img.0.to_str().unwrap();
    let out = mkfs(&["-s", "32M", p], dev_full());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "mkfs.pmfs: {p}: formatted, but writing the report to standard output failed: \
             No space left on device\n"
        )
    );
    // -q writes no report: nothing to fail.
    let out = mkfs(&["-q", "-f", p], dev_full());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --help too fails when it cannot be written, as coreutils' --help does.
    let out = mkfs(&["--help"], dev_full());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "mkfs.pmfs: write error on standard output: No space left on device\n"
    );
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let img = image_path("pipe");
    let p = img.0.to_str().unwrap();
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = mkfs(&["-s", "32M", p], Stdio::from(writer));
    assert_eq!(
        out.status.code(),
        Some(141),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // The file system was made all the same.
    let out = mkfs(&[p], Stdio::null());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already contains a pmfs file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Right after `umount` the old daemon may hold the device a moment longer: mkfs waits for
/// it, and on a terminal says so (run under script(1), which gives it one).
#[test]
fn a_held_device_is_waited_for_and_the_wait_said_on_a_terminal() {
    let img = image_path("held");
    let p = img.0.to_str().unwrap();
    let out = mkfs(&["-q", "-s", "32M", p], Stdio::null());
    assert!(out.status.success());
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping the terminal half: no script(1)");
        return;
    }
    let held = pmfs::device::Device::open(&img.0, &WAIT_FOR_FORKS).unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        drop(held);
    });
    let out = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("'{BIN}' -f -q '{p}'"))
        .arg("/dev/null")
        .env("PMFS_PROGRESS_DELAY", "60")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    releaser.join().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(out.status.success(), "{said}");
    assert_eq!(
        said,
        format!(
            "mkfs.pmfs: {p}: in use by another program (a pmfs daemon still exiting after \
             umount?): waiting up to 5 s for it to let go\n"
        )
    );
}

/// Progress: on a terminal a status line, redrawn and erased at the end; elsewhere nothing.
/// (PMFS_PROGRESS_DELAY=0 shows it at once; a held device keeps mkfs in one phase long
/// enough to see it.)
#[test]
fn progress_is_shown_on_a_terminal_only() {
    let img = image_path("progress");
    let p = img.0.to_str().unwrap();
    assert!(
        mkfs(&["-q", "-s", "32M", p], Stdio::null())
            .status
            .success()
    );
    let hold = || {
        let held = pmfs::device::Device::open(&img.0, &WAIT_FOR_FORKS).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(800));
            drop(held);
        })
    };
    // Not a terminal: not a byte on stderr.
    let releaser = hold();
    let out = Command::new(BIN)
        .args(["-f", "-q", p])
        .env("PMFS_PROGRESS_DELAY", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    releaser.join().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping the terminal half: no script(1)");
        return;
    }
    let releaser = hold();
    let out = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("'{BIN}' -f -q '{p}'"))
        .arg("/dev/null")
        .env("PMFS_PROGRESS_DELAY", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    releaser.join().unwrap();
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("\rmkfs.pmfs: {p}: waiting for the device ")),
        "{said:?}"
    );
    assert!(
        said.ends_with("\r\x1b[K"),
        "the line is erased at the end: {said:?}"
    );
}

/// The root directory's (uid, gid, mode) in the image at `path`, as the core reads it.
fn root_dir_of(path: &Path) -> (u32, u32, u32) {
    let dev = pmfs::device::Device::open(path, &WAIT_FOR_FORKS).unwrap();
    let media: std::sync::Arc<dyn pmfs::device::Media> = std::sync::Arc::new(dev);
    let fs = pmfs::fs::Fs::mount(
        media,
        pmfs::fs::MountOptions {
            read_only: true,
            ..pmfs::fs::MountOptions::default()
        },
    )
    .unwrap();
    let a = fs.getattr(pmfs::format::ROOT_INO).unwrap();
    (a.uid, a.gid, a.mode)
}

const DIR_MODE: u32 = 0o040000;

/// Issue 14, item 2: the root directory's owner and mode. Root's format is root's unless it
/// says otherwise (`--root-owner`, `-E root_owner=`, `--root-mode`); the report says which.
#[test]
fn root_owner_and_mode_as_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test formats as root and as another user: it needs root"
    );
    let img = image_path("root-owner");
    let p = img.0.to_str().unwrap();
    let out = mkfs(&["-s", "32M", p], Stdio::piped());
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("  root directory  owner 0:0, mode 0755\n")
    );
    assert_eq!(root_dir_of(&img.0), (0, 0, DIR_MODE | 0o755));

    let out = mkfs(
        &["-f", "--root-owner", "1234:5678", "--root-mode", "2770", p],
        Stdio::piped(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("  root directory  owner 1234:5678, mode 2770\n")
    );
    assert_eq!(root_dir_of(&img.0), (1234, 5678, DIR_MODE | 0o2770));

    // mke2fs's spelling; root_owner alone is the caller, root here.
    assert!(
        mkfs(&["-q", "-f", "-E", "root_owner=7:8", p], Stdio::null())
            .status
            .success()
    );
    assert_eq!(root_dir_of(&img.0), (7, 8, DIR_MODE | 0o755));
    assert!(
        mkfs(&["-q", "-f", "-E", "root_owner", p], Stdio::null())
            .status
            .success()
    );
    assert_eq!(root_dir_of(&img.0).0, 0);

    // Bad values: clap's one error line (then its hint), status 2, nothing formatted.
    let before = std::fs::read(&img.0).unwrap();
    for (args, said) in [
        (
            &["--root-owner", "1000"][..],
            "error: invalid value '1000' for '--root-owner <UID:GID>': expected UID:GID, two \
             numbers below 4294967295 such as 1000:1000",
        ),
        (
            &["--root-owner=-1:0"][..],
            "error: invalid value '-1:0' for '--root-owner <UID:GID>': expected UID:GID, two \
             numbers below 4294967295 such as 1000:1000",
        ),
        (
            &["--root-mode", "0800"][..],
            "error: invalid value '0800' for '--root-mode <MODE>': expected an octal mode such \
             as 0755, at most 07777",
        ),
        (
            &["--root-mode", "17777"][..],
            "error: invalid value '17777' for '--root-mode <MODE>': expected an octal mode such \
             as 0755, at most 07777",
        ),
        (
            &["-E", "root_owner=1:x"][..],
            "error: invalid value 'root_owner=1:x' for '-E <OPTIONS>': root_owner=1:x: expected \
             UID:GID, two numbers below 4294967295 such as 1000:1000",
        ),
        (
            &["-E", "stride=4"][..],
            "error: invalid value 'stride=4' for '-E <OPTIONS>': unknown extended option \
             'stride=4' (there is only root_owner[=UID:GID])",
        ),
    ] {
        let argv: Vec<&str> = [&["-f"][..], args, &[p][..]].concat();
        let out = mkfs(&argv, Stdio::null());
        assert_eq!(out.status.code(), Some(2), "{argv:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().next(), Some(said), "{argv:?}: {err}");
    }
    assert!(
        std::fs::read(&img.0).unwrap() == before,
        "a refusal changed the image"
    );
}

/// A user's format is the user's: the root directory belongs to the caller's real uid and
/// gid (so the user can mount it and write), unless `--root-owner` / `-E root_owner=` say
/// otherwise. Run as uid 65534 through setpriv, in a directory every user may write.
#[test]
fn a_users_format_gives_the_user_the_root_directory() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test formats as root and as another user: it needs root"
    );
    let dir = tempfile::Builder::new()
        .prefix("pmfs-mkfs-user-")
        .tempdir_in(scratch_dir())
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let img = dir.path().join("user.img");
    let as_user = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                BIN,
            ])
            .args(args)
            .arg(&img)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv (util-linux) runs mkfs.pmfs as another user")
    };
    let out = as_user(&["-s", "32M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("  root directory  owner 65534:65534, mode 0755\n")
    );
    assert_eq!(root_dir_of(&img), (65534, 65534, DIR_MODE | 0o755));
    let out = as_user(&["-q", "-f", "-E", "root_owner=0:0", "--root-mode", "1777"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(root_dir_of(&img), (0, 0, DIR_MODE | 0o1777));
    let out = as_user(&["-q", "-f", "--root-owner", "10:20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(root_dir_of(&img), (10, 20, DIR_MODE | 0o755));
}
