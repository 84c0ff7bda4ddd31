//! mkfs.pmfs's output as a user meets it (issue 14): a report that cannot be written is a
//! failure with one line (`> /dev/full`), a reader that leaves early ends it quietly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
