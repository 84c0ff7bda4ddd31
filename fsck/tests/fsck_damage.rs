//! The corruption-injection suite, through the real binary on image files in /dev/shm: for
//! every damage class, `fsck -f -n` finds it (exit 4) and changes nothing, `fsck -f -y`
//! repairs it (exit 1), a forced check afterwards is clean (exit 0), and the repaired image
//! mounts. (`-f` because the damaged images are marked clean: without it, fsck only checks
//! the superblocks, state record and journal, as e2fsck does, and damage there is found
//! without `-f` too: see `low_level_damage_is_found_without_force`.)
//! Damage fsck cannot repair (a truncated image, a device that is not pmfs) is an
//! operational error (exit 8) with a one-line message.
#![allow(clippy::unwrap_used)]

mod common;

use pmfs::device::{Device, Media, OpenOptions, RecordingDevice};
use pmfs::fs::{Fs, MountOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_fsck-pmfs");

/// An image file that is removed when dropped.
struct ImageFile(PathBuf);

impl Drop for ImageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image_file(name: &str, bytes: &[u8]) -> ImageFile {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("pmfs-fsck-{}-{n}-{name}.img", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    ImageFile(path)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn fsck(args: &[&str], path: &Path) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn describe(what: &str, r: &Run) -> String {
    format!(
        "{what}: exit {}\n--- stdout\n{}--- stderr\n{}",
        r.code, r.stdout, r.stderr
    )
}

/// Mounting the image (in memory) works, or fails with an error: never a panic.
/// Mounts a repaired image and reads the root; `file1` (the inode of /a/file1) must have
/// kept its attribute flags.
fn mounts(bytes: Vec<u8>, file1: u64) -> Result<(), String> {
    let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(bytes));
    let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).map_err(|e| e.to_string())?;
    fs.readdir(1, 0, &mut |_, _, _, _| false)
        .map_err(|e| e.to_string())?;
    let flags = fs.attr_flags(file1).map_err(|e| e.to_string())?;
    if flags != common::FILE1_FLAGS {
        return Err(format!(
            "/a/file1 has attribute flags {flags:#x} after the repair, not {:#x}",
            common::FILE1_FLAGS
        ));
    }
    fs.shutdown().map_err(|e| e.to_string())
}

#[test]
fn every_damage_class_through_the_binary() {
    let base = common::build();
    let mut failures = Vec::new();
    for d in common::damages() {
        let mut img = base.clone();
        (d.apply)(&mut img);
        let file = image_file(d.name, &img.bytes);
        let check = fsck(&["-fn"], &file.0);
        if d.fatal {
            if check.code != 8
                || !check.stderr.contains(d.expect)
                || check.stderr.lines().count() != 1
            {
                failures.push(describe(&format!("{}: fsck -n (want 8)", d.name), &check));
            }
            let fix = fsck(&["-fy"], &file.0);
            if fix.code != 8 {
                failures.push(describe(&format!("{}: fsck -y (want 8)", d.name), &fix));
            }
            continue;
        }
        if check.code != 4 || !check.stdout.contains(d.expect) {
            failures.push(describe(
                &format!("{}: fsck -n (want 4, mentioning {:?})", d.name, d.expect),
                &check,
            ));
        }
        if std::fs::read(&file.0).unwrap() != img.bytes {
            failures.push(format!("{}: fsck -n changed the image", d.name));
        }
        let fix = fsck(&["-fy"], &file.0);
        if fix.code != 1 {
            failures.push(describe(&format!("{}: fsck -y (want 1)", d.name), &fix));
        }
        let again = fsck(&["-f", "-n"], &file.0);
        if again.code != 0 {
            failures.push(describe(
                &format!("{}: fsck -f -n (want 0)", d.name),
                &again,
            ));
        }
        // Repaired means marked clean: the quick path says so at once.
        let quick = fsck(&["-n"], &file.0);
        if quick.code != 0 || !quick.stdout.contains(": clean, ") {
            failures.push(describe(
                &format!("{}: fsck -n after repair", d.name),
                &quick,
            ));
        }
        if let Err(e) = mounts(std::fs::read(&file.0).unwrap(), img.ino["/a/file1"]) {
            failures.push(format!("{}: mount after repair: {e}", d.name));
        }
        eprintln!("{}: ok\n{}", d.name, fix.stdout);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn low_level_damage_is_found_without_force() {
    let base = common::build();
    for name in [
        "superblock",
        "backup-superblock",
        "journal-garbage",
        "journal-bad-target",
    ] {
        let mut img = base.clone();
        let d = common::damages()
            .into_iter()
            .find(|d| d.name == name)
            .unwrap();
        (d.apply)(&mut img);
        let file = image_file(name, &img.bytes);
        let r = fsck(&["-n"], &file.0);
        assert_eq!(r.code, 4, "{}", describe(name, &r));
        let r = fsck(&["-p"], &file.0);
        assert_eq!(r.code, 1, "{}", describe(name, &r));
        let r = fsck(&["-n"], &file.0);
        assert!(r.stdout.contains(": clean, "), "{}", describe(name, &r));
    }
}

#[test]
fn damaged_images_mount_or_fail_cleanly() {
    // Before any repair: mounting a damaged image returns (Ok or a clear error).
    let base = common::build();
    for d in common::damages() {
        let mut img = base.clone();
        (d.apply)(&mut img);
        match mounts(img.bytes.clone(), img.ino["/a/file1"]) {
            Ok(()) => eprintln!("{}: mounts", d.name),
            Err(e) => {
                assert!(!e.is_empty() && !e.contains('\n'), "{}: {e:?}", d.name);
                eprintln!("{}: mount refused: {e}", d.name);
            }
        }
    }
}

#[test]
fn clean_file_system_is_reported_at_once() {
    let img = common::build();
    let file = image_file("clean", &img.bytes);
    let r = fsck(&["-n"], &file.0);
    assert_eq!(r.code, 0, "{}", describe("-n", &r));
    assert!(r.stdout.contains(": clean, "), "{}", r.stdout);
    assert!(r.stdout.contains(" inodes, ") && r.stdout.contains(" blocks"));
    let r = fsck(&["-f", "-n", "-v"], &file.0);
    assert_eq!(r.code, 0, "{}", describe("-f -n -v", &r));
    assert!(r.stdout.contains("checked "), "{}", r.stdout);
    let r = fsck(&["-fp"], &file.0);
    assert_eq!(r.code, 0, "{}", describe("-fp", &r));
    assert_eq!(std::fs::read(&file.0).unwrap(), img.bytes);
}

#[test]
fn unclean_but_consistent_is_checked_and_marked_clean() {
    let img = common::build();
    let mut bytes = img.bytes.clone();
    // Mount and drop without shutdown: the state record says "not clean".
    {
        let media: Arc<dyn Media> = Arc::new(RecordingDevice::from_image(bytes.clone()));
        let fs = Fs::mount(Arc::clone(&media), MountOptions::default()).unwrap();
        drop(fs);
        let mut b = vec![0u8; bytes.len()];
        media.read(0, &mut b).unwrap();
        bytes = b;
    }
    let file = image_file("unclean", &bytes);
    let r = fsck(&["-n"], &file.0);
    assert_eq!(r.code, 0, "{}", describe("-n", &r));
    assert!(
        !r.stdout.contains(": clean, "),
        "a full check must run: {}",
        r.stdout
    );
    let r = fsck(&["-y"], &file.0);
    assert_eq!(r.code, 0, "{}", describe("-y", &r));
    let r = fsck(&["-n"], &file.0);
    assert!(
        r.stdout.contains(": clean, "),
        "{}",
        describe("-n after -y", &r)
    );
}

#[test]
fn without_a_mode_and_without_a_terminal_it_only_checks() {
    let base = common::build();
    let mut img = base.clone();
    let d = common::damages()
        .into_iter()
        .find(|d| d.name == "link-counts")
        .unwrap();
    (d.apply)(&mut img);
    let file = image_file("no-mode", &img.bytes);
    let r = fsck(&["-f"], &file.0);
    assert_eq!(r.code, 4, "{}", describe("no mode", &r));
    assert_eq!(std::fs::read(&file.0).unwrap(), img.bytes);
}

#[test]
fn preen_repairs_only_what_is_safe() {
    let base = common::build();
    let pick = |name: &str| {
        let mut img = base.clone();
        let d = common::damages()
            .into_iter()
            .find(|d| d.name == name)
            .unwrap();
        (d.apply)(&mut img);
        img
    };
    let img = pick("link-counts");
    let file = image_file("preen-counts", &img.bytes);
    let r = fsck(&["-fp"], &file.0);
    assert_eq!(r.code, 1, "{}", describe("-p link counts", &r));
    assert_eq!(fsck(&["-f", "-n"], &file.0).code, 0);

    let img = pick("unreachable");
    let file = image_file("preen-unreachable", &img.bytes);
    let r = fsck(&["-fa"], &file.0);
    assert_eq!(r.code & 4, 4, "{}", describe("-a unreachable", &r));
    assert!(r.stdout.contains("RUN fsck.pmfs MANUALLY"), "{}", r.stdout);
    assert!(!r.stdout.contains("lost+found"), "{}", r.stdout);
    let r = fsck(&["-fy"], &file.0);
    assert_eq!(r.code, 1, "{}", describe("-y after -a", &r));
    assert!(r.stdout.contains("/lost+found/#"), "{}", r.stdout);
    assert_eq!(fsck(&["-f", "-n"], &file.0).code, 0);
}

#[test]
fn a_busy_device_is_refused() {
    let img = common::build();
    let file = image_file("busy", &img.bytes);
    let held = Device::open(&file.0, &OpenOptions::default()).unwrap();
    for args in [&["-y"][..], &["-n"][..]] {
        let r = fsck(args, &file.0);
        assert_eq!(r.code, 8, "{}", describe("busy", &r));
        assert!(r.stderr.contains("busy"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
    drop(held);
    assert_eq!(fsck(&["-n"], &file.0).code, 0);
}

#[test]
fn usage_errors_and_help() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Exit codes") && out.contains("-p"), "{out}");
    for bad in [
        &[][..],
        &["-n", "-y", "x"][..],
        &["-p", "-y", "x"][..],
        &["-q", "x"][..],
    ] {
        let (code, _, err) = run(bad);
        assert_eq!(code, 16, "{bad:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
    }
    let (code, _, err) = run(&["-n", "/nonexistent/pmfs.img"]);
    assert_eq!(code, 8, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
