//! fsck.pmfs on crafted hostile trees (fsck/tests/common/mod.rs, `make_hostile`: a DAG of
//! `MAX_TREE_LEVEL` levels over a real or an empty leaf, leaves out of key order, a cycle
//! across levels) as the directory tree of /big, the extent tree of /frag and the orphan
//! list of a 64 MiB image: `-f -n` reports the tree (exit 4) and changes nothing, `-f -y`
//! rebuilds it (exit 1), a forced check afterwards is clean (exit 0). Every run gets a
//! deadline (the child is killed past it: a hang is a failure) and an address-space limit
//! (`ulimit -v`), so a walk that grows with the number of paths fails instead of eating
//! the machine's memory.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Shape, Target};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fsck-pmfs");
/// Each run must end within this (measured); the child is killed at 6 times it.
const RUN: Duration = Duration::from_secs(5);
/// Address space a run may use, in KiB: the 64 MiB device mapping, the checker's own
/// structures and the binary, with room to spare.
const ADDRESS_SPACE_KIB: u64 = 1024 * 1024;

struct ImageFile(PathBuf);

impl Drop for ImageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image_file(name: &str, bytes: &[u8]) -> ImageFile {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("pmfs-hostile-{}-{name}.img", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    ImageFile(path)
}

/// Runs fsck under the address-space limit and the deadline: (exit code, stdout, time).
fn fsck(what: &str, args: &[&str], path: &Path) -> (i32, String, Duration) {
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\""
        ))
        .arg(BIN)
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > 6 * RUN {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: fsck {args:?} still running after {:?}: killed",
                6 * RUN
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    let code = status.code().unwrap_or(-1);
    eprintln!("{what}: fsck {args:?}: exit {code} in {took:?}");
    assert!(took < RUN, "{what}: fsck {args:?} took {took:?}");
    (code, format!("{stdout}--- stderr\n{stderr}"), took)
}

fn shapes(t: Target) {
    let base = common::build();
    for shape in [
        Shape::Dag,
        Shape::DagOfEmptyLeaves,
        Shape::OutOfOrder,
        Shape::Cycle,
    ] {
        let name = format!("{t:?}-{shape:?}");
        let mut img = base.clone();
        img.make_hostile(t, shape);
        let file = image_file(&name, &img.bytes);
        let (code, out, _) = fsck(&name, &["-f", "-n"], &file.0);
        assert_eq!(code, 4, "{name}: fsck -f -n\n{out}");
        assert!(
            std::fs::read(&file.0).unwrap() == img.bytes,
            "{name}: fsck -n changed the image"
        );
        let (code, out, _) = fsck(&name, &["-f", "-y"], &file.0);
        assert_eq!(code, 1, "{name}: fsck -f -y\n{out}");
        let (code, out, _) = fsck(&name, &["-f", "-n"], &file.0);
        assert_eq!(code, 0, "{name}: fsck -f -n after repair\n{out}");
    }
}

#[test]
fn hostile_directory_trees_are_reported_and_rebuilt_in_bounded_time() {
    shapes(Target::Dir);
}

#[test]
fn hostile_extent_trees_are_reported_and_rebuilt_in_bounded_time() {
    shapes(Target::Extents);
}

#[test]
fn hostile_orphan_lists_are_reported_and_rebuilt_in_bounded_time() {
    shapes(Target::Orphans);
}
