//! fsck's one-line messages for devices it cannot check, as a user meets them (issue 14):
//! they say what the mount says, never an internal detail such as an out-of-bounds access.
#![allow(clippy::unwrap_used)]

use pmfs::device::{Device, create_image};
use pmfs::mkfs::{MkfsOptions, format};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Opens wait out a lock that another test thread's fork holds a copy of until the child
/// execs (the harness forks children all the time); a real holder is still refused.
const WAIT_FOR_FORKS: pmfs::device::OpenOptions = pmfs::device::OpenOptions {
    read_only: false,
    wait_busy: Some(std::time::Duration::from_secs(10)),
};

const BIN: &str = env!("CARGO_BIN_EXE_fsck-pmfs");

struct ImageFile(PathBuf);

impl Drop for ImageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn formatted(name: &str, size: u64) -> ImageFile {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("pmfs-fsck-msg-{}-{name}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    create_image(&path, size).unwrap();
    let dev = Device::open(&path, &WAIT_FOR_FORKS).unwrap();
    format(&dev, &MkfsOptions::default()).unwrap();
    drop(dev);
    ImageFile(path)
}

fn fsck(args: &[&str], path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_image_truncated_to_4_kib_is_called_truncated_as_the_mount_does() {
    let img = formatted("trunc4k", 32 << 20);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.0)
        .unwrap();
    f.set_len(4096).unwrap();
    drop(f);
    // What the mount reports for this device (the superblock's own check).
    let dev = Device::open(&img.0, &WAIT_FOR_FORKS).unwrap();
    let said = pmfs::fs::read_superblock(&dev).unwrap_err().to_string();
    drop(dev);
    assert!(said.contains("(truncated image?)"), "{said}");
    for args in [&["-n"][..], &["-fn"], &["-fy"], &["-p"]] {
        let (code, out, err) = fsck(args, &img.0);
        assert_eq!(code, 8, "fsck {args:?}: {out}{err}");
        assert_eq!(
            err,
            format!("fsck.pmfs: {}: {said}\n", img.0.display()),
            "fsck {args:?}"
        );
        assert!(!err.contains("out of bounds"), "{err}");
    }
}

#[test]
fn output_that_cannot_be_written_is_one_line() {
    let img = formatted("devfull", 32 << 20);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(BIN)
        .args(["-fn"])
        .arg(&img.0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "fsck.pmfs: write error on standard output: No space left on device\n"
    );
}
