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

fn image_path(name: &str) -> ImageFile {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("pmfs-mkfs-out-{}-{name}.img", std::process::id()));
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
