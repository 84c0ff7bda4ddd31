//! The preload library (`preload/`, libpmfs_direct.so) through a real mount: unmodified
//! programs give the same results with and without it, it really serves their calls
//! (`PMFS_DIRECT_STATS`), and what another process does through the mount (truncate, punch,
//! rewrite) is seen by the next served call and never lets a served read show data past
//! EOF or another file's data. Needs root, /dev/fuse and a C compiler (`cc`).

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::fs::{self, OpenOptions as FileOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// The library: built by cargo as this package's dev-dependency, next to the test binary
/// (`target/<profile>/deps/libpmfs_direct-*.so`) or uplifted one level up.
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let uplifted = deps.parent().unwrap().join("libpmfs_direct.so");
    let mut found: Vec<PathBuf> = fs::read_dir(deps)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libpmfs_direct") && n.ends_with(".so"))
        })
        .collect();
    found.push(uplifted);
    found.retain(|p| p.exists());
    found.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    found
        .pop()
        .expect("libpmfs_direct.so is not built next to the test binary")
}

/// The counters one run printed (`PMFS_DIRECT_STATS=file`), summed over its processes.
#[derive(Debug, Default)]
struct Stats {
    tracked: u64,
    served_reads: u64,
    served_writes: u64,
    served_mmaps: u64,
    real_mmaps: u64,
    refreshes: u64,
    allocations: u64,
    extensions: u64,
}

fn stats_of(file: &Path) -> Stats {
    let text = fs::read_to_string(file).unwrap_or_default();
    let mut s = Stats::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let get = |k: &str| {
            words
                .iter()
                .position(|w| *w == k)
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        s.tracked += get("tracked");
        s.served_reads += get("served_reads");
        s.served_writes += get("served_writes");
        s.served_mmaps += get("served_mmaps");
        s.real_mmaps += get("real_mmaps");
        s.refreshes += get("refreshes");
        s.allocations += get("allocations");
        s.extensions += get("extensions");
    }
    s
}

/// Runs `cmd` once plain and once under the library; returns (stdout plain, stdout
/// preloaded, the preloaded run's counters).
fn both_ways(tmp: &Path, name: &str, args: &[&str]) -> (Vec<u8>, Vec<u8>, Stats) {
    let plain = Command::new(name).args(args).output().unwrap();
    assert!(plain.status.success(), "{name} {args:?}: {plain:?}");
    let stats = tmp.join(format!("stats-{name}-{}", args.len()));
    let _ = fs::remove_file(&stats);
    let pre = Command::new(name)
        .args(args)
        .env("LD_PRELOAD", library())
        .env("PMFS_DIRECT_STATS", &stats)
        .output()
        .unwrap();
    assert!(
        pre.status.success(),
        "{name} {args:?} under the library: {pre:?}"
    );
    (plain.stdout, pre.stdout, stats_of(&stats))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[test]
fn unmodified_programs_give_the_same_results_and_are_served() {
    assert!(can_mount());
    let img = Image::new("preload", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(3, (5 * MIB + 1234) as usize);
    let f = m.path("data");
    fs::write(&f, &data).unwrap();
    let fs_ = f.to_str().unwrap();

    // cat: every read(2) served.
    let (plain, pre, st) = both_ways(tmp.path(), "cat", &[fs_]);
    assert_eq!(plain, data);
    assert_eq!(pre, data, "cat under the library read other bytes");
    assert!(
        st.tracked >= 1 && st.served_reads > 0,
        "cat was not served: {st:?}"
    );

    // dd reading from the middle.
    let args = ["if", "bs=4096", "skip=300", "count=7", "status=none"];
    let a = [&format!("if={fs_}")[..], args[1], args[2], args[3], args[4]];
    let (plain, pre, st) = both_ways(tmp.path(), "dd", &a);
    assert_eq!(plain, &data[300 * 4096..307 * 4096]);
    assert_eq!(pre, plain);
    assert!(st.served_reads > 0, "dd was not served: {st:?}");

    // dd overwriting in place (conv=notrunc): the same file contents either way, and the
    // writes were served.
    let src = tmp.path().join("src");
    fs::write(&src, pattern(77, 40 * 4096)).unwrap();
    let plain_copy = m.path("plain-copy");
    fs::write(&plain_copy, &data).unwrap();
    for (target, preload) in [(&plain_copy, false), (&f, true)] {
        let stats = tmp.path().join("stats-dd-write");
        let _ = fs::remove_file(&stats);
        let mut cmd = Command::new("dd");
        cmd.arg(format!("if={}", src.display()))
            .arg(format!("of={}", target.display()))
            .args([
                "bs=4096",
                "seek=5",
                "count=40",
                "conv=notrunc",
                "status=none",
            ]);
        if preload {
            cmd.env("LD_PRELOAD", library())
                .env("PMFS_DIRECT_STATS", &stats);
        }
        assert!(cmd.status().unwrap().success());
        if preload {
            let st = stats_of(&stats);
            assert_eq!(
                st.served_writes, 40,
                "dd's overwrites were not all served: {st:?}"
            );
        }
    }
    let expected = fs::read(&plain_copy).unwrap();
    assert_eq!(expected.len(), data.len());
    assert_eq!(
        fs::read(&f).unwrap(),
        expected,
        "served writes differ from real ones"
    );

    // cp out of the mount and back in.
    let out = tmp.path().join("copied");
    let (_, _, _) = both_ways(tmp.path(), "cp", &[fs_, out.to_str().unwrap()]);
    assert_eq!(fs::read(&out).unwrap(), expected);
    let back = m.path("back");
    let (_, _, _) = both_ways(
        tmp.path(),
        "cp",
        &[out.to_str().unwrap(), back.to_str().unwrap()],
    );
    assert_eq!(fs::read(&back).unwrap(), expected);

    // python3: read() and mmap of the file.
    if Command::new("python3")
        .arg("-c")
        .arg("1")
        .status()
        .is_ok_and(|s| s.success())
    {
        let script = format!(
            "import mmap, hashlib\n\
             f = open('{fs_}', 'r+b')\n\
             a = hashlib.sha256(f.read()).hexdigest()\n\
             m = mmap.mmap(f.fileno(), 0)\n\
             b = hashlib.sha256(m[:]).hexdigest()\n\
             old = m[10:15]\n\
             m[10:15] = b'hello'\n\
             m.flush()\n\
             f.seek(8)\n\
             seen = f.read(9)\n\
             m[10:15] = old\n\
             m.flush()\n\
             print(a, b, seen)\n"
        );
        let (plain, pre, st) = both_ways(tmp.path(), "python3", &["-c", &script]);
        assert_eq!(plain, pre, "python3 differs under the library");
        assert!(
            st.served_reads > 0 && st.served_mmaps > 0,
            "python3's read() and mmap were not served: {st:?}"
        );
        assert!(String::from_utf8_lossy(&pre).contains("hello"), "{pre:?}");
        assert_eq!(fs::read(&f).unwrap(), expected);
    } else {
        eprintln!("python3 is not installed: its read/mmap check did not run");
    }
}

/// What every C program of these tests starts with ([`compile_c`] prepends it): the
/// headers they use, the FNV-1a hash [`fnv`] computes on the Rust side, `MIB` and `CHECK`
/// (prints the failed condition and returns 1).
const C_PRELUDE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static unsigned long long fnv(const unsigned char *p, long n) {
    unsigned long long h = 1469598103934665603ULL;
    for (long i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h;
}
#define MIB (1L << 20)
#define CHECK(c) do { if (!(c)) { printf("FAILED %s line %d errno %d\n", #c, __LINE__, errno); return 1; } } while (0)
"#;

/// A C program that runs commands from stdin on one file opened O_RDWR, one reply line
/// each, so a test can interleave its own (plain) operations with served calls:
/// `p OFF LEN` pread, `r LEN` read at the offset, `s OFF` lseek, `w OFF LEN BYTE` pwrite,
/// `d` replace the fd by a dup of it, `e OFF LEN` pread with errno set to 1234 first (the
/// reply shows errno after), `c SECS` race mode (see the race test), `x OFF MS` writes
/// racing chattr (see the chattr test), `q` quit.
const PROBE_C: &str = r#"
/* Thread mode: the file holds pattern(seed): byte i is seed + i % 251. */
static int shared_fd;
static int seed_byte;
static long thread_bad;
static void *reader(void *arg) {
    unsigned seed = (unsigned)(long)arg;
    unsigned char b[4096];
    for (int k = 0; k < 20000; k++) {
        /* Every other round through a private dup of the fd, closed after. */
        int fd = k % 2 ? dup(shared_fd) : shared_fd;
        long long off = rand_r(&seed) % (3 << 20);
        long n = pread(fd, b, sizeof b, off);
        for (long i = 0; i < n; i++)
            if (b[i] != (unsigned char)(seed_byte + (off + i) % 251)) { __sync_fetch_and_add(&thread_bad, 1); break; }
        if (n <= 0) __sync_fetch_and_add(&thread_bad, 1);
        if (fd != shared_fd) close(fd);
    }
    return 0;
}

static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    static unsigned char buf[1 << 20];
    char cmd[8];
    long long a, b, c;
    while (scanf("%7s", cmd) == 1) {
        if (!strcmp(cmd, "p") && scanf("%lld %lld", &a, &b) == 2) {
            long n = pread(fd, buf, b, a);
            printf("%ld %llx\n", n, n > 0 ? fnv(buf, n) : 0ULL);
        } else if (!strcmp(cmd, "e") && scanf("%lld %lld", &a, &b) == 2) {
            errno = 1234;
            long n = pread(fd, buf, b, a);
            printf("%ld errno %d\n", n, errno);
        } else if (!strcmp(cmd, "r") && scanf("%lld", &a) == 1) {
            long n = read(fd, buf, a);
            printf("%ld %llx\n", n, n > 0 ? fnv(buf, n) : 0ULL);
        } else if (!strcmp(cmd, "s") && scanf("%lld", &a) == 1) {
            printf("%lld\n", (long long)lseek(fd, a, SEEK_SET));
        } else if (!strcmp(cmd, "w") && scanf("%lld %lld %lld", &a, &b, &c) == 3) {
            memset(buf, (int)c, b);
            printf("%ld\n", (long)pwrite(fd, buf, b, a));
        } else if (!strcmp(cmd, "d")) {
            int d = dup(fd);
            close(fd);
            fd = d;
            printf("%d\n", fd >= 0);
        } else if (!strcmp(cmd, "c") && scanf("%lld", &a) == 1) {
            /* Race mode: random 4 KiB preads for `a` seconds; every byte must be 'A', 'B'
               or 0, and no read may end past 8 MiB. */
            long long reads = 0, bad = 0, past = 0, bytes = 0;
            unsigned seed = 12345;
            double end = now() + a;
            while (now() < end) {
                long long off = (rand_r(&seed) % 2048) * 4096LL + rand_r(&seed) % 4096;
                long n = pread(fd, buf, 4096, off);
                if (n < 0) { perror("pread"); return 1; }
                if (off + n > 8 << 20) past++;
                for (long i = 0; i < n; i++)
                    if (buf[i] != 'A' && buf[i] != 'B' && buf[i] != 0) { bad++; break; }
                bytes += n;
                reads++;
            }
            printf("reads %lld bad %lld past %lld bytes %lld\n", reads, bad, past, bytes);
        } else if (!strcmp(cmd, "t") && scanf("%lld %lld", &a, &b) == 2) {
            /* `t THREADS SEED`: threads preading (half through dups they close again)
               check every byte against the pattern. */
            pthread_t th[16];
            shared_fd = fd; seed_byte = (int)b; thread_bad = 0;
            for (long i = 0; i < a && i < 16; i++) pthread_create(&th[i], 0, reader, (void *)(i + 1));
            for (long i = 0; i < a && i < 16; i++) pthread_join(th[i], 0);
            printf("bad %ld\n", thread_bad);
        } else if (!strcmp(cmd, "k") && scanf("%lld", &a) == 1) {
            /* `k LEN`: fork; the child reads LEN bytes with read(2) from the shared
               offset and exits; then the parent reads LEN more. Prints both hashes. */
            pid_t pid = fork();
            if (pid == 0) {
                long n = read(fd, buf, a);
                printf("child %ld %llx\n", n, n > 0 ? fnv(buf, n) : 0ULL);
                fflush(stdout);
                _exit(0);
            }
            int status;
            waitpid(pid, &status, 0);
            long n = read(fd, buf, a);
            printf("parent %ld %llx\n", n, n > 0 ? fnv(buf, n) : 0ULL);
        } else if (!strcmp(cmd, "x") && scanf("%lld %lld", &a, &b) == 2) {
            /* `x OFF MS`: pwrites 64 bytes of value k & 255 (k = 1, 2, ...) at OFF for MS
               ms or until one fails; prints the last k that returned 64 and the errno of
               the failure (0: none). */
            double end = now() + b / 1000.0;
            long long k = 0;
            int err = 0;
            while (now() < end) {
                memset(buf, (int)((k + 1) & 255), 64);
                if (pwrite(fd, buf, 64, a) != 64) { err = errno; break; }
                k++;
            }
            printf("last %lld errno %d\n", k, err);
        } else if (!strcmp(cmd, "q")) {
            return 0;
        } else {
            printf("?\n");
        }
        fflush(stdout);
    }
    return 0;
}
"#;

fn compile_probe(dir: &Path) -> PathBuf {
    compile_c(dir, "probe", PROBE_C)
}

/// Compiles C program `src` (after [`C_PRELUDE`]) as `dir/name`.
fn compile_c(dir: &Path, name: &str, src: &str) -> PathBuf {
    let path = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    fs::write(&path, format!("{C_PRELUDE}{src}")).unwrap();
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-pthread", "-o"])
        .arg(&exe)
        .arg(&path)
        .output()
        .expect("this test needs a C compiler (cc)");
    assert!(out.status.success(), "cc: {out:?}");
    exe
}

/// The probe, driven line by line.
struct Probe {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    replies: mpsc::Receiver<String>,
}

impl Probe {
    fn start(exe: &Path, file: &Path, stats: Option<&Path>) -> Probe {
        let mut cmd = Command::new(exe);
        cmd.arg(file).stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some(stats) = stats {
            cmd.env("LD_PRELOAD", library())
                .env("PMFS_DIRECT_STATS", stats);
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        Probe {
            child,
            stdin,
            replies,
        }
    }

    /// Sends `cmd`, waits (bounded) for its reply.
    fn ask(&mut self, cmd: &str, timeout: Duration) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        match self.replies.recv_timeout(timeout) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.child.kill();
                panic!("probe: no reply to {cmd:?} within {timeout:?}: {e}");
            }
        }
    }

    fn quit(mut self) {
        writeln!(self.stdin, "q").unwrap();
        drop(self.stdin);
        let deadline = Instant::now() + MOUNT_DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "probe exited with {s}");
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("probe did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn fnv(b: &[u8]) -> String {
    let mut h: u64 = 1469598103934665603;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(1099511628211);
    }
    format!("{} {:x}", b.len(), if b.is_empty() { 0 } else { h })
}

/// What a pread of `len` at `off` must return, read plainly through the mount now.
fn expect(path: &Path, off: u64, len: usize) -> String {
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, off).unwrap();
    fnv(&buf[..n])
}

const T: Duration = Duration::from_secs(20);

#[test]
fn served_calls_see_what_other_processes_do_through_the_mount() {
    assert!(can_mount());
    let img = Image::new("preload-coherence", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_probe(tmp.path());
    let path = m.path("file");
    fs::write(&path, pattern(11, (3 * MIB) as usize)).unwrap();
    let stats = tmp.path().join("stats");
    // The same script, plain and preloaded, must give the same replies.
    let mut transcripts = Vec::new();
    for preload in [false, true] {
        fs::write(&path, pattern(11, (3 * MIB) as usize)).unwrap();
        let mut p = Probe::start(&exe, &path, preload.then_some(stats.as_path()));
        let mut log = Vec::new();
        let mut check = |p: &mut Probe, cmd: &str, want: String| {
            let got = p.ask(cmd, T);
            assert_eq!(got, want, "{cmd} (preloaded: {preload})");
            log.push(got);
        };
        check(&mut p, "p 100000 5000", expect(&path, 100000, 5000));
        check(&mut p, "e 0 10", "10 errno 1234".into());
        // Another process truncates: the next served pread sees the new size.
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096 + 10)
            .unwrap();
        check(&mut p, "p 100000 5000", "0 0".into());
        let tail = expect(&path, 4000, 5000);
        assert!(tail.starts_with("106 "), "{tail}");
        check(&mut p, "p 4000 5000", tail);
        // Extending again must show zeros, not the old bytes.
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 * MIB)
            .unwrap();
        check(&mut p, "p 8192 4096", fnv(&[0u8; 4096]));
        // Another process rewrites; the next served read sees it.
        let f = fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&pattern(200, 8192), 0).unwrap();
        check(&mut p, "p 0 8192", fnv(&pattern(200, 8192)));
        // A punched hole reads as zeros.
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
        .unwrap();
        let punched = [&[0u8; 4096][..], &pattern(200, 8192)[4096..]].concat();
        assert_eq!(expect(&path, 0, 8192), fnv(&punched));
        check(&mut p, "p 0 8192", fnv(&punched));
        // A served overwrite is seen by other processes at once, and by read(2) after a
        // dup and an lseek.
        check(&mut p, "w 4096 100 66", "100".into());
        let mut seen = vec![0u8; 100];
        f.read_exact_at(&mut seen, 4096).unwrap();
        assert_eq!(
            seen,
            vec![66u8; 100],
            "a served write is not visible through the mount"
        );
        // chattr +i after the open: the overwrite is refused (EPERM) and stores nothing,
        // whether or not the library is there; then +a (writes only at the end of file).
        for flag in ["+i", "+a"] {
            let st = Command::new("chattr")
                .arg(flag)
                .arg(&path)
                .status()
                .unwrap();
            assert!(st.success(), "chattr {flag}");
            check(&mut p, "w 4096 100 77", "-1".into());
            f.read_exact_at(&mut seen, 4096).unwrap();
            assert_eq!(
                seen,
                vec![66u8; 100],
                "a write stored into a chattr {flag} file"
            );
            let unset = flag.replace('+', "-");
            let st = Command::new("chattr")
                .arg(&unset)
                .arg(&path)
                .status()
                .unwrap();
            assert!(st.success(), "chattr {unset}");
        }
        check(&mut p, "d", "1".into());
        check(&mut p, "s 4096", "4096".into());
        check(&mut p, "r 100", fnv(&[66u8; 100]));
        check(&mut p, "r 4000", expect(&path, 4196, 4000));
        p.quit();
        transcripts.push(log);
    }
    assert_eq!(transcripts[0], transcripts[1]);
    let st = stats_of(&stats);
    assert!(
        st.tracked == 1 && st.served_reads == 9 && st.served_writes == 1,
        "the probe was not served: {st:?}"
    );
}

#[test]
fn a_racing_truncate_punch_and_rewrite_never_shows_other_files_or_bytes_past_eof() {
    assert!(can_mount());
    let img = Image::new("preload-race", 512 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_probe(tmp.path());
    let path = m.path("raced");
    fs::write(&path, vec![b'A'; 8 << 20]).unwrap();
    let stats = tmp.path().join("stats");
    let mut p = Probe::start(&exe, &path, Some(&stats));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, progress, path) = (Arc::clone(&stop), Arc::clone(&progress), path.clone());
        let other = m.path("other");
        std::thread::spawn(move || {
            let f = FileOptions::new().write(true).open(&path).unwrap();
            let mut seed = 7u64;
            let mut rnd = |n: u64| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) % n
            };
            // The probe's lease defers every free of this file until it closes, and each
            // round frees at most what its rewrite (at most 1 MiB) allocated: the 512 MiB
            // image holds the 8 MiB file and 400 rounds of deferred frees (a writer with
            // direct writes under cache=direct makes more than 600 rounds in 4 s).
            const MAX_ROUNDS: u64 = 400;
            while !stop.load(Ordering::Relaxed) && progress.load(Ordering::Relaxed) < MAX_ROUNDS {
                // Shrink, let another file take whatever was freed, punch, rewrite, grow.
                f.set_len(rnd(8 << 20)).unwrap();
                fs::write(&other, vec![b'X'; 4 << 20]).unwrap();
                let (off, len) = (rnd(8 << 20), 1 + rnd(1 << 20));
                let _ = nix::fcntl::fallocate(
                    &f,
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                );
                f.write_all_at(&vec![b'B'; len as usize], off.min((8 << 20) - len))
                    .unwrap();
                f.set_len(8 << 20).unwrap();
                fs::remove_file(&other).unwrap();
                progress.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The reader runs for 4 s; the watchdog is the reply timeout (and the writer must make
    // progress meanwhile).
    let reply = p.ask("c 4", Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    p.quit();
    let rounds = progress.load(Ordering::Relaxed);
    let words: Vec<&str> = reply.split_whitespace().collect();
    let get = |k: &str| -> u64 {
        let i = words.iter().position(|w| *w == k).unwrap();
        words[i + 1].parse().unwrap()
    };
    assert!(rounds >= 3, "the writer made only {rounds} rounds");
    assert!(get("reads") > 1000, "{reply}");
    assert_eq!(
        get("bad"),
        0,
        "served reads showed bytes no version of the file had: {reply}"
    );
    assert_eq!(get("past"), 0, "{reply}");
    let st = stats_of(&stats);
    assert!(st.served_reads > 0, "nothing was served: {st:?}");
    eprintln!("race: {reply}; writer rounds {rounds}; {st:?}");
}

#[test]
fn threads_dups_and_forks_are_served_correctly() {
    assert!(can_mount());
    let img = Image::new("preload-threads", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_probe(tmp.path());
    let path = m.path("threads");
    let data = pattern(9, (3 * MIB + 4096) as usize);
    fs::write(&path, &data).unwrap();
    let stats = tmp.path().join("stats");
    let mut p = Probe::start(&exe, &path, Some(&stats));
    // Four threads, half of their preads through dups they close concurrently.
    assert_eq!(p.ask("t 4 9", Duration::from_secs(120)), "bad 0");
    // A forked child shares the file offset: read(2) in the child moves the parent's.
    assert_eq!(p.ask("s 1000", T), "1000");
    let child = p.ask("k 5000", T);
    let parent = p.replies.recv_timeout(T).unwrap();
    assert_eq!(child, format!("child {}", fnv(&data[1000..6000])));
    assert_eq!(parent, format!("parent {}", fnv(&data[6000..11000])));
    p.quit();
    let st = stats_of(&stats);
    // 80,000 preads in the threads; read(2) after the fork goes to the kernel.
    assert!(st.served_reads >= 80_000, "{st:?}");
}

/// A C program that maps pmfs files (`mapper steps DIR`, `mapper hold FILE`, `mapper
/// writer FILE`; see each function's comment).
const MAPPER_C: &str = r#"
/* `steps DIR`: files DIR/shared (6 MiB + 100, written), DIR/sparse (a hole), DIR/ro. */
static int steps(const char *dir) {
    char p[4096];
    static unsigned char buf[8 << 20];
    snprintf(p, sizeof p, "%s/shared", dir);
    int fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    long size = 6 * MIB + 100;
    unsigned char *m = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    printf("shared contents %llx\n", fnv(m, size));
    memcpy(m, "first", 5);
    memcpy(m + 2 * MIB + 7, "middle", 6);
    memcpy(m + size - 5, "last!", 5);
    CHECK(msync(m, size, MS_SYNC) == 0);
    CHECK(pread(fd, buf, size, 0) == size);
    printf("pread after msync %llx\n", fnv(buf, size));
    /* partial munmap: the middle 2 MiB go, both ends stay usable */
    CHECK(munmap(m + 2 * MIB, 2 * MIB) == 0);
    memcpy(m + 4096, "stillmapped", 11);
    CHECK(msync(m, 2 * MIB, MS_SYNC) == 0);
    memcpy(m + 4 * MIB + 1, "tail", 4);
    CHECK(msync(m + 4 * MIB, 2 * MIB + 4096, MS_SYNC) == 0);
    errno = 0;
    int r = msync(m + 2 * MIB, 4096, MS_SYNC);
    printf("msync of the hole: %d errno %d\n", r, errno);
    errno = 0;
    r = msync(m + 1, 4096, MS_SYNC);
    printf("unaligned msync: %d errno %d\n", r, errno);
    CHECK(munmap(m, 2 * MIB) == 0);
    /* close before unmap: the mapping lives on */
    close(fd);
    memcpy(m + 5 * MIB, "afterclose", 10);
    CHECK(msync(m + 4 * MIB, 4096 + 2 * MIB, MS_SYNC) == 0);
    CHECK(munmap(m + 4 * MIB, 2 * MIB + 4096) == 0);

    fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    /* MAP_PRIVATE: stores stay in this process */
    unsigned char *q = mmap(0, 3 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    CHECK(q != MAP_FAILED);
    memcpy(q + 10, "PRIVATE", 7);
    CHECK(pread(fd, buf, 20, 0) == 20);
    printf("private: mapping %llx file %llx\n", fnv(q, 20), fnv(buf, 20));
    CHECK(munmap(q, 3 * MIB) == 0);
    /* fork: the child stores through the inherited shared mapping */
    m = mmap(0, 4 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    pid_t pid = fork();
    if (pid == 0) {
        memcpy(m + 3 * MIB, "fromchild", 9);
        msync(m + 3 * MIB, 4096, MS_SYNC);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    printf("after fork: %.9s\n", m + 3 * MIB);

    CHECK(munmap(m, 4 * MIB) == 0);
    /* past the end of the file: the kernel's mapping either way */
    m = mmap(0, 8 * MIB, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    printf("long mapping reads %.5s\n", m);
    CHECK(munmap(m, 8 * MIB) == 0);
    close(fd);

    /* a sparse file: the shared mapping allocates the hole, reads see zeros first */
    snprintf(p, sizeof p, "%s/sparse", dir);
    fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    m = mmap(0, 4 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    printf("hole reads %llx\n", fnv(m, 4 * MIB));
    memcpy(m + 3 * MIB + 3, "inthehole", 9);
    CHECK(msync(m, 4 * MIB, MS_SYNC) == 0);
    CHECK(munmap(m, 4 * MIB) == 0);
    CHECK(pread(fd, buf, 4 * MIB, 0) == 4 * MIB);
    printf("sparse file %llx\n", fnv(buf, 4 * MIB));
    close(fd);

    /* truncated inside a page: the mapping's bytes past the end of file read as zeros */
    snprintf(p, sizeof p, "%s/tail", dir);
    fd = open(p, O_RDWR | O_CREAT, 0644);
    CHECK(fd >= 0);
    memset(buf, 'T', 4096);
    CHECK(pwrite(fd, buf, 4096, 0) == 4096);
    CHECK(ftruncate(fd, 16) == 0);
    m = mmap(0, 16, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    printf("last page after truncate %llx\n", fnv(m, 4096));
    CHECK(munmap(m, 16) == 0);
    close(fd);

    /* read-only descriptor: no PROT_WRITE on a shared mapping, now or later */
    snprintf(p, sizeof p, "%s/ro", dir);
    fd = open(p, O_RDONLY);
    CHECK(fd >= 0);
    errno = 0;
    m = mmap(0, 2 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    printf("rw map of a read-only fd: %s errno %d\n", m == MAP_FAILED ? "refused" : "mapped", errno);
    m = mmap(0, 2 * MIB, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    printf("ro contents %llx\n", fnv(m, 2 * MIB));
    errno = 0;
    r = mprotect(m, 4096, PROT_READ | PROT_WRITE);
    printf("mprotect write: %d errno %d\n", r, errno);
    CHECK(munmap(m, 2 * MIB) == 0);
    close(fd);
    return 0;
}

/* `hold FILE`: maps the first 8 MiB shared, says "mapped", and after a line on stdin
   (another process truncated the file and filled other files with 'Z') counts the bytes of
   the mapping past 4 KiB that are not 'A', stores past the new end, says so and exits. */
static int hold(const char *path) {
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0);
    unsigned char *m = mmap(0, 8 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    printf("mapped\n");
    fflush(stdout);
    char line[64];
    CHECK(fgets(line, sizeof line, stdin));
    long other = 0, zeds = 0;
    for (long i = 4096; i < 8 * MIB; i++) {
        other += m[i] != 'A';
        zeds += m[i] == 'Z';
    }
    memset(m + 8192, 'S', 4096);
    CHECK(msync(m, 8 * MIB, MS_SYNC) == 0);
    CHECK(munmap(m, 8 * MIB) == 0);
    printf("not-A %ld Z %ld\n", other, zeds);
    return 0;
}

/* `writer FILE`: forever, record k goes to 4 KiB slot k % 1024 of the file (written, at
   least 4 MiB): alternately stored through a shared mapping and msynced, or pwritten;
   "ok K" once the call returned. Record: 8 bytes k, then 4088 bytes (k * 7) & 255. */
static int writer(const char *path) {
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0);
    unsigned char *m = mmap(0, 4 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    unsigned char rec[4096];
    for (unsigned long long k = 1;; k++) {
        long slot = k % 1024;
        memcpy(rec, &k, 8);
        memset(rec + 8, (int)((k * 7) & 255), sizeof rec - 8);
        if (k % 2) {
            memcpy(m + slot * 4096, rec, sizeof rec);
            CHECK(msync(m + slot * 4096, 4096, MS_SYNC) == 0);
        } else {
            CHECK(pwrite(fd, rec, sizeof rec, slot * 4096) == sizeof rec);
        }
        printf("ok %llu\n", k);
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "steps")) return steps(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "hold")) return hold(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "writer")) return writer(argv[2]);
    fprintf(stderr, "usage: mapper steps DIR | hold FILE | writer FILE\n");
    return 2;
}
"#;

/// Runs `exe args`, plain or under the library (counters to `stats`), bounded by `T`;
/// returns its stdout.
fn run_bounded(exe: &Path, args: &[&Path], stats: Option<&Path>) -> String {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(stats) = stats {
        cmd.env("LD_PRELOAD", library())
            .env("PMFS_DIRECT_STATS", stats);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + T;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{exe:?} {args:?} did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{exe:?} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn mmap_munmap_msync_fork_and_close_behave_as_without_the_library() {
    assert!(can_mount());
    let img = Image::new("preload-mmap", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "mapper", MAPPER_C);
    let stats = tmp.path().join("stats");
    let shared = pattern(5, (6 * MIB + 100) as usize);
    let mut outputs = Vec::new();
    for preload in [false, true] {
        let dir = m.path(if preload { "preloaded" } else { "plain" });
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("shared"), &shared).unwrap();
        fs::File::create(dir.join("sparse"))
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        fs::write(dir.join("ro"), &shared[..(2 * MIB) as usize]).unwrap();
        let out = run_bounded(
            &exe,
            &[Path::new("steps"), &dir],
            preload.then_some(&*stats),
        );
        assert!(!out.contains("FAILED"), "preloaded: {preload}: {out}");
        outputs.push((
            out,
            fs::read(dir.join("shared")).unwrap(),
            fs::read(dir.join("sparse")).unwrap(),
        ));
    }
    assert_eq!(
        outputs[0].0, outputs[1].0,
        "the program saw different things"
    );
    assert!(outputs[0].1 == outputs[1].1, "the shared file differs");
    assert!(outputs[0].2 == outputs[1].2, "the sparse file differs");
    assert!(
        outputs[1].0.contains("after fork: fromchild"),
        "{}",
        outputs[1].0
    );
    let st = stats_of(&stats);
    // Served: the shared, private, forked, sparse, truncated and read-only mappings; the
    // kernel's: the one past the end of the file and the refused PROT_WRITE of a read-only
    // fd.
    assert!(
        st.served_mmaps == 6 && st.real_mmaps == 2,
        "mappings were not served as expected: {st:?}"
    );
}

#[test]
fn a_mapping_never_shows_another_files_data_after_a_truncate_by_another_process() {
    assert!(can_mount());
    let img = Image::new("preload-mmap-truncate", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "mapper", MAPPER_C);
    let stats = tmp.path().join("stats");
    let path = m.path("held");
    fs::write(&path, vec![b'A'; (8 * MIB) as usize]).unwrap();
    let mut child = Command::new(&exe)
        .arg("hold")
        .arg(&path)
        .env("LD_PRELOAD", library())
        .env("PMFS_DIRECT_STATS", &stats)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, replies) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    assert_eq!(replies.recv_timeout(T).unwrap(), "mapped");
    // Truncate while mapped, then fill the space the file gave up with other files.
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let others: Vec<PathBuf> = (0..3).map(|i| m.path(&format!("other{i}"))).collect();
    for o in &others {
        fs::write(o, vec![b'Z'; (48 * MIB) as usize]).unwrap();
    }
    writeln!(stdin, "go").unwrap();
    drop(stdin);
    let reply = replies.recv_timeout(T).unwrap();
    assert!(child.wait().unwrap().success());
    // The mapping kept showing the blocks it mapped (the truncated file's old bytes): never
    // the other files' data; its stores past the new end reached no file.
    assert_eq!(reply, "not-A 0 Z 0");
    assert_eq!(fs::read(&path).unwrap(), vec![b'A'; 4096]);
    for o in &others {
        assert!(
            fs::read(o).unwrap().iter().all(|&b| b == b'Z'),
            "{o:?} shows a store made through another file's mapping"
        );
    }
    assert_eq!(stats_of(&stats).served_mmaps, 1);
}

/// Runs `cmd`, which prints `ok N` after each write that returned, until `kill_at` or until
/// it acknowledged `enough`, then kills it (SIGKILL); returns the last N it acknowledged,
/// counting those written before the kill. The watchdog: an acknowledgement at least every
/// 10 s.
fn kill_writer(mut cmd: Command, kill_at: Instant, enough: u64) -> u64 {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, acks) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let n: u64 = line.strip_prefix("ok ").unwrap().parse().unwrap();
            if tx.send(n).is_err() {
                break;
            }
        }
    });
    let mut acked = 0u64;
    while Instant::now() < kill_at && acked < enough {
        match acks.recv_timeout(Duration::from_secs(10)) {
            Ok(n) => acked = n,
            Err(e) => panic!("the writer made no progress for 10 s: {e}"),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    while let Ok(n) = acks.recv_timeout(Duration::from_millis(200)) {
        acked = n;
    }
    acked
}

/// Kills `m`'s daemon (SIGKILL) and lets the mount go: the next mount recovers.
fn kill_daemon(mut m: Mount) {
    let mut daemon = m.child.take().unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    drop(m);
}

#[test]
fn killing_a_writer_under_the_library_loses_no_returned_write() {
    assert!(can_mount());
    let img = Image::new("preload-kill9", 256 * MIB);
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "mapper", MAPPER_C);
    const SLOTS: u64 = 1024;
    for round in 0..3u64 {
        let m = Mount::new(&img, "");
        let name = format!("records{round}");
        let path = m.path(&name);
        fs::write(&path, vec![0u8; (SLOTS * 4096) as usize]).unwrap();
        let mut cmd = Command::new(&exe);
        cmd.arg("writer").arg(&path).env("LD_PRELOAD", library());
        let kill_at = Instant::now() + Duration::from_millis(300 + 700 * round);
        let acked = kill_writer(cmd, kill_at, u64::MAX);
        assert!(acked > 100, "round {round}: only {acked} writes returned");
        // The daemon dies too: recovery at the next mount must keep every returned write.
        kill_daemon(m);
        let m = Mount::new(&img, "");
        let data = fs::read(m.path(&name)).unwrap();
        assert_eq!(data.len() as u64, SLOTS * 4096);
        // Record acked + 1 may have been under way (stored in part) when the writer died.
        let in_flight = (acked + 1) % SLOTS;
        for slot in (0..SLOTS).filter(|&s| s != in_flight) {
            let rec = &data[(slot * 4096) as usize..((slot + 1) * 4096) as usize];
            let k = u64::from_le_bytes(rec[..8].try_into().unwrap());
            // The last returned write of this slot: the largest l <= acked, l % SLOTS ==
            // slot, l > 0.
            let l = (acked / SLOTS) * SLOTS + slot;
            let l = if l > acked {
                l.checked_sub(SLOTS)
            } else {
                Some(l)
            };
            let want = l.filter(|&l| l > 0).unwrap_or(0);
            assert_eq!(k, want, "round {round}: slot {slot} (acked up to {acked})");
            let fill = if k == 0 { 0 } else { ((k * 7) & 255) as u8 };
            assert!(
                rec[8..].iter().all(|&b| b == fill),
                "round {round}: record {k} is not what was written"
            );
        }
        m.unmount();
    }
}

/// Runs `program args` with `input` on stdin, plain or under the library (counters to
/// `stats`); returns stdout.
fn run_with_input(program: &str, args: &[&str], input: &str, stats: Option<&Path>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(stats) = stats {
        cmd.env("LD_PRELOAD", library())
            .env("PMFS_DIRECT_STATS", stats);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{program} {args:?} (preloaded: {}): {out:?}",
        stats.is_some()
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn python_mmap_and_sqlite_give_the_same_results_under_the_library() {
    assert!(can_mount());
    let img = Image::new("preload-programs", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let has = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        has("python3", "-V"),
        "this test needs python3 (its mmap and sqlite3 modules)"
    );
    // python3: stores through a shared mapping (a 2 MiB-aligned 4 MiB + 10 file, and a
    // private one that must not reach the file), then cat reads the file back, plain and
    // preloaded.
    let script = "import mmap, sys, hashlib\n\
                  f = open(sys.argv[1], 'r+b')\n\
                  m = mmap.mmap(f.fileno(), 0)\n\
                  before = hashlib.sha256(m[:]).hexdigest()\n\
                  for i in range(0, len(m) - 16, 65536):\n\
                  \x20   m[i:i + 16] = b'stored-by-mmap%02d' % (i // 65536 % 100)\n\
                  m.flush()\n\
                  m.resize(len(m) + 3 * 1048576)\n\
                  m[-9:] = b'resized!!'\n\
                  m.flush()\n\
                  p = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)\n\
                  p[0:7] = b'private'\n\
                  p.close()\n\
                  m.close()\n\
                  f.close()\n\
                  print(before)\n";
    let data = pattern(21, (4 * MIB + 10) as usize);
    let mut results = Vec::new();
    for preload in [false, true] {
        let stats = tmp.path().join(format!("stats-python-{preload}"));
        let file = m.path(&format!("py-{preload}"));
        fs::write(&file, &data).unwrap();
        let f = file.to_str().unwrap();
        let out = run_with_input(
            "python3",
            &["-c", script, f],
            "",
            preload.then_some(&*stats),
        );
        let cat = Command::new("cat").arg(&file).output().unwrap().stdout;
        let (_, cat_pre, cat_st) = both_ways(tmp.path(), "cat", &[f]);
        assert!(cat == cat_pre, "cat reads other bytes under the library");
        assert!(cat_st.served_reads > 0, "cat was not served: {cat_st:?}");
        if preload {
            let st = stats_of(&stats);
            // The mapping, its resize (mapped afresh) and the private one.
            assert_eq!(
                st.served_mmaps, 3,
                "python3's mappings were not served: {st:?}"
            );
        }
        results.push((out, cat));
    }
    assert_eq!(results[0].0, results[1].0);
    assert!(
        results[0].1 == results[1].1,
        "the files differ after python3's stores"
    );
    assert!(results[1].1.starts_with(b"stored-by-mmap00"));
    assert!(results[1].1.ends_with(b"resized!!"));

    // sqlite3 with memory-mapped I/O and a WAL (whose -shm index is a shared mapping): the
    // command-line shell if installed, else python3's sqlite3 module.
    let sql = "PRAGMA mmap_size = 268435456;\n\
               PRAGMA journal_mode = WAL;\n\
               CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, v REAL);\n\
               WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000)\n\
               INSERT INTO t SELECT x, printf('name-%08d', x * 7919 % 20011), x * 0.5 FROM c;\n\
               CREATE INDEX t_name ON t (name);\n\
               UPDATE t SET v = v * 3 WHERE id % 7 = 0;\n\
               DELETE FROM t WHERE id % 11 = 0;\n\
               PRAGMA wal_checkpoint(TRUNCATE);\n\
               SELECT count(*), sum(v), min(name), max(name) FROM t;\n\
               SELECT name FROM t WHERE name LIKE 'name-0000%' ORDER BY name LIMIT 5;\n\
               PRAGMA integrity_check;\n";
    let shell = has("sqlite3", "-version");
    eprintln!(
        "sqlite: {}",
        if shell {
            "the sqlite3 shell"
        } else {
            "python3's sqlite3 module"
        }
    );
    let mut outs = Vec::new();
    for preload in [false, true] {
        let stats = tmp.path().join(format!("stats-sqlite-{preload}"));
        let db = m.path(&format!("db-{preload}.sqlite"));
        let db = db.to_str().unwrap();
        let out = if shell {
            run_with_input("sqlite3", &[db], sql, preload.then_some(&*stats))
        } else {
            let py = "import sqlite3, sys\n\
                      c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
                      for stmt in sys.stdin.read().split(';\\n'):\n\
                      \x20   if stmt.strip():\n\
                      \x20       for row in c.execute(stmt):\n\
                      \x20           print('|'.join(map(str, row)))\n";
            run_with_input("python3", &["-c", py, db], sql, preload.then_some(&*stats))
        };
        if preload {
            let st = stats_of(&stats);
            assert!(
                st.served_mmaps > 0 && st.served_reads > 0,
                "sqlite was not served: {st:?}"
            );
        }
        outs.push(out);
    }
    assert_eq!(
        outs[0], outs[1],
        "sqlite answers differently under the library"
    );
    assert!(outs[1].contains("18182|"), "{}", outs[1]);
    assert!(outs[1].trim_end().ends_with("ok"), "{}", outs[1]);
}

#[test]
fn served_writes_racing_chattr_immutable_land_before_it_or_not_at_all() {
    assert!(can_mount());
    let img = Image::new("preload-chattr-race", 128 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_probe(tmp.path());
    let path = m.path("pinned");
    fs::write(&path, vec![0u8; MIB as usize]).unwrap();
    let stats = tmp.path().join("stats");
    let mut p = Probe::start(&exe, &path, Some(&stats));
    let at = 8192u64;
    let read64 = || {
        let mut b = [0u8; 64];
        fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut b, at)
            .unwrap();
        b
    };
    let chattr = |flag: &str| {
        let st = Command::new("chattr")
            .arg(flag)
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success(), "chattr {flag}");
    };
    for round in 0..20u64 {
        writeln!(p.stdin, "x {at} 400").unwrap();
        p.stdin.flush().unwrap();
        // chattr +i somewhere inside the writer's 400 ms.
        std::thread::sleep(Duration::from_millis(50 + round * 13 % 300));
        chattr("+i");
        let after_chattr = read64();
        let reply = p
            .replies
            .recv_timeout(T)
            .expect("the writer did not finish");
        let words: Vec<&str> = reply.split_whitespace().collect();
        let last: u64 = words[1].parse().unwrap();
        let errno: i32 = words[3].parse().unwrap();
        let now = read64();
        chattr("-i");
        assert_eq!(errno, libc::EPERM, "round {round}: {reply}");
        assert_eq!(
            now, after_chattr,
            "round {round}: the file changed after chattr +i returned"
        );
        assert!(
            now.iter().all(|&b| b == (last & 255) as u8),
            "round {round}: the file holds {:?}, the last write that returned wrote {}",
            &now[..4],
            last & 255
        );
    }
    p.quit();
    let st = stats_of(&stats);
    assert!(
        st.served_writes > 1000,
        "the writes were not served: {st:?}"
    );
}

/// `churn FILE N`: N rounds of a 4 KiB append (the kernel's: it moves the layout
/// generation) then a 4 KiB overwrite near the start (servable after a refresh).
const CHURN_C: &str = r#"
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDWR);
    CHECK(fd >= 0);
    long rounds = atol(argv[2]);
    unsigned char buf[4096];
    for (long i = 0; i < rounds; i++) {
        memset(buf, (int)(i % 251), sizeof buf);
        off_t end = lseek(fd, 0, SEEK_END);
        CHECK(pwrite(fd, buf, sizeof buf, end) == (ssize_t)sizeof buf);
        CHECK(pwrite(fd, buf, 100, (i % 16) * 4096 + i % 3000) == 100);
    }
    CHECK(close(fd) == 0);
    printf("done\n");
    return 0;
}
"#;

#[test]
fn a_file_changing_between_every_two_calls_is_not_refreshed_for_every_call() {
    // Each served overwrite follows an append that moved the generation: refreshing for
    // every one (an ioctl per 64 extents, mmap and munmap of the whole view) is what made
    // compare.sh's "4 KiB rand write, new files, 4 threads" (four fio processes that
    // shared one file, bench/RESULTS.md session 6) crawl at 0.1 kIOPS.
    assert!(can_mount());
    let img = Image::new("preload-churn", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "churn", CHURN_C);
    let stats = tmp.path().join("stats");
    let rounds = 2000u64;
    let mut contents = Vec::new();
    for preload in [false, true] {
        let path = m.path(if preload { "churn-pre" } else { "churn-plain" });
        fs::write(&path, pattern(9, 64 * 1024)).unwrap();
        let rounds_arg = PathBuf::from(rounds.to_string());
        let out = run_bounded(&exe, &[&path, &rounds_arg], preload.then_some(&*stats));
        assert_eq!(out, "done\n", "preloaded: {preload}");
        contents.push(fs::read(&path).unwrap());
    }
    assert!(contents[0] == contents[1], "the files differ");
    let st = stats_of(&stats);
    assert_eq!(st.tracked, 1, "{st:?}");
    assert!(
        st.refreshes < rounds / 10,
        "{} refreshes for {rounds} overwrites that each followed a change: {st:?}",
        st.refreshes
    );
}

/// Appenders for the tests of served appends and writes into unallocated space. Byte `o`
/// of every file they write holds `f(o)`, never 0, so each byte can be checked alone.
/// `appender FILE MODE ... BS`, writes of BS bytes with write(2) at the file offset:
/// - `kill BS`: appends for ever, printing `ok END` after each write returns;
/// - `race SECS MAXBYTES BS`: for SECS seconds or MAXBYTES written, seeks to the end and
///   writes there; once the file passes 8 MiB truncates it to 2 MiB and a bit (another
///   process truncates and punches it too); prints `writes N truncates N`;
/// - `fill SIZE BS`: writes SIZE bytes from offset 0 (over whatever the file holds);
/// - `threads T MAXBYTES BS`: T threads pwrite the next BS bytes past the end claimed so far
///   until MAXBYTES, racing appends past each other; prints `end N`.
const APPENDER_C: &str = r#"
static unsigned char f(long long o) { return (unsigned char)(o % 251 + 1); }
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
static unsigned char buf[4 << 20];
static int fill(long long off, long bs) {
    for (long i = 0; i < bs; i++) buf[i] = f(off + i);
    return 0;
}
/* `threads` mode: each thread claims the next BS bytes past what was claimed so far and
   pwrites them, so appends of several threads race, each extending past the others. */
static int threads, shared_fd, thread_failed;
static long block;
static long long max_bytes, next_off;
static void *appender(void *arg) {
    static __thread unsigned char b[1 << 20];
    for (;;) {
        long long off = __sync_fetch_and_add(&next_off, block);
        if (off >= max_bytes) { __sync_fetch_and_sub(&next_off, block); return 0; }
        for (long i = 0; i < block; i++) b[i] = f(off + i);
        if (pwrite(shared_fd, b, block, off) != block) { thread_failed = 1; return 0; }
    }
}
int main(int argc, char **argv) {
    int fd = open(argv[1], O_WRONLY | O_CREAT, 0644);
    CHECK(fd >= 0);
    long bs = atol(argv[argc - 1]);
    CHECK(bs > 0 && bs <= (long)sizeof buf);
    if (!strcmp(argv[2], "kill")) {
        long long end = lseek(fd, 0, SEEK_END);
        for (;;) {
            fill(end, bs);
            CHECK(write(fd, buf, bs) == bs);
            end += bs;
            printf("ok %lld\n", end);
            fflush(stdout);
        }
    }
    if (!strcmp(argv[2], "race")) {
        double stop = now() + atof(argv[3]);
        long long max = atoll(argv[4]), written = 0, writes = 0, truncates = 0;
        unsigned seed = 7;
        while (now() < stop && written < max) {
            long long off = lseek(fd, 0, SEEK_END);
            CHECK(off >= 0);
            if (off > 8 * MIB) {
                CHECK(ftruncate(fd, 2 * MIB + rand_r(&seed) % MIB) == 0);
                truncates++;
                continue;
            }
            CHECK(lseek(fd, off, SEEK_SET) == off);
            fill(off, bs);
            CHECK(write(fd, buf, bs) == bs);
            written += bs;
            writes++;
        }
        printf("writes %lld truncates %lld\n", writes, truncates);
        return 0;
    }
    if (!strcmp(argv[2], "threads")) {
        threads = atoi(argv[3]);
        max_bytes = atoll(argv[4]);
        block = bs;
        shared_fd = fd;
        next_off = lseek(fd, 0, SEEK_END);
        pthread_t th[16];
        CHECK(threads > 0 && threads <= 16);
        for (long i = 0; i < threads; i++) pthread_create(&th[i], 0, appender, 0);
        for (long i = 0; i < threads; i++) pthread_join(th[i], 0);
        CHECK(thread_failed == 0);
        CHECK(close(fd) == 0);
        printf("end %lld\n", next_off);
        return 0;
    }
    if (!strcmp(argv[2], "fill")) {
        long long size = atoll(argv[3]);
        for (long long off = 0; off < size; off += bs) {
            long n = size - off < bs ? size - off : bs;
            fill(off, n);
            CHECK(write(fd, buf, n) == n);
        }
        CHECK(close(fd) == 0);
        printf("done\n");
        return 0;
    }
    printf("?\n");
    return 1;
}
"#;

/// What an appender writes at file offset `o` (see [`APPENDER_C`]).
fn appended(o: u64) -> u8 {
    (o % 251 + 1) as u8
}

/// Runs the appender (see [`APPENDER_C`]) on `file` with `args`, plain or under the
/// library (counters to `stats`); returns its output.
fn run_appender(exe: &Path, file: &Path, args: &[String], stats: Option<&Path>) -> String {
    let mut all = vec![file.to_path_buf()];
    all.extend(args.iter().map(PathBuf::from));
    let all: Vec<&Path> = all.iter().map(|p| p.as_path()).collect();
    run_bounded(exe, &all, stats)
}

/// The first offset of `data` that holds neither 0 nor what an appender writes there.
fn first_foreign_byte(data: &[u8]) -> Option<usize> {
    data.iter()
        .enumerate()
        .find(|&(o, &b)| b != 0 && b != appended(o as u64))
        .map(|(o, _)| o)
}

#[test]
fn appends_are_served_and_writes_into_holes_and_preallocated_space_keep_the_layout() {
    // A file written from empty by 1 MiB and by 4 KiB + 100 byte writes (appends: the
    // first 2 MiB through the kernel, then allocated ahead and extended by the daemon), one
    // laid out with fallocate(2) and one with ftruncate(2) and then written over: the same
    // bytes as without the library, nothing left allocated past the end, and the same
    // holes and data (SEEK_HOLE/SEEK_DATA) where the writes left some.
    assert!(can_mount());
    let img = Image::new("preload-append", 512 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "appender", APPENDER_C);
    let size = 37 * MIB + 4321;
    // (name, layout, bytes the appender writes from offset 0, write size)
    let cases: [(&str, &str, u64, u64); 4] = [
        ("appended-1m", "", size, MIB),
        ("appended-4k", "", size, 4196),
        ("preallocated", "fallocate", 5 * MIB + 77, 256 * 1024),
        ("truncated", "truncate", 5 * MIB + 77, 256 * 1024),
    ];
    for (name, layout, written, bs) in cases {
        let mut contents = Vec::new();
        let mut seeks = Vec::new();
        for preload in [false, true] {
            let path = m.path(&format!("{name}-{preload}"));
            let f = FileOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            match layout {
                "fallocate" => {
                    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, size as i64)
                        .unwrap();
                }
                "truncate" => f.set_len(size).unwrap(),
                _ => {}
            }
            drop(f);
            let stats = tmp.path().join(format!("stats-{name}"));
            let _ = fs::remove_file(&stats);
            let args = ["fill".to_string(), written.to_string(), bs.to_string()];
            let out = run_appender(&exe, &path, &args, preload.then_some(&*stats));
            assert_eq!(out, "done\n", "{name}, preloaded: {preload}");
            let meta = fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), size, "{name}, preloaded: {preload}");
            // Blocks past the end are given back at close, up to the chunk after it.
            use std::os::unix::fs::MetadataExt;
            assert!(
                meta.blocks() * 512 <= size.next_multiple_of(2 * MIB),
                "{name}, preloaded {preload}: {} bytes allocated for {size}",
                meta.blocks() * 512
            );
            if preload {
                let st = stats_of(&stats);
                let writes = written.div_ceil(bs);
                if layout.is_empty() {
                    // The kernel writes what the daemon must place first: the first 2 MiB.
                    let kernel = (2 * MIB).div_ceil(bs) + 1;
                    assert!(
                        st.served_writes + kernel >= writes
                            && st.allocations > 0
                            && st.extensions > 0,
                        "{name}: {writes} writes, {st:?}"
                    );
                } else {
                    assert_eq!(
                        (st.served_writes, st.allocations),
                        (0, 0),
                        "{name}: writes into a hole or preallocated space are the kernel's"
                    );
                }
            }
            let f = fs::File::open(&path).unwrap();
            let seek = |from: u64, whence| {
                nix::unistd::lseek(&f, from as i64, whence).map_err(|e| e as i32)
            };
            seeks.push([
                seek(0, nix::unistd::Whence::SeekHole),
                seek(written + 1, nix::unistd::Whence::SeekData),
                seek(written + 1, nix::unistd::Whence::SeekHole),
            ]);
            contents.push(fs::read(&path).unwrap());
        }
        assert!(
            contents[0] == contents[1],
            "{name}: the files differ with and without the library"
        );
        assert_eq!(seeks[0], seeks[1], "{name}: holes and data differ");
        let data = &contents[1][..written as usize];
        assert_eq!(first_foreign_byte(&contents[1]), None, "{name}");
        assert!(data.iter().all(|&b| b != 0), "{name}: a zero byte");
    }
    m.unmount();
}

#[test]
fn served_appends_racing_truncates_and_punches_show_no_stale_or_foreign_bytes() {
    // The appender's stores past the end of file become part of it only through the
    // daemon's EXTEND at the generation they were made in: a truncate or punch by another
    // process in between makes it refuse (the write then goes through the kernel). Any
    // byte of the file is the appender's for its offset or zero (a hole, a gap a truncate
    // left): never stale bytes of another file freed meanwhile (0xEE).
    assert!(can_mount());
    let img = Image::new("preload-append-race", GIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "appender", APPENDER_C);
    let path = m.path("appended");
    fs::write(&path, (0..3 * MIB).map(appended).collect::<Vec<u8>>()).unwrap();
    let stats = tmp.path().join("stats");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let other = {
        let (stop, progress, path) = (Arc::clone(&stop), Arc::clone(&progress), path.clone());
        let other = m.path("other");
        std::thread::spawn(move || {
            let f = FileOptions::new().write(true).open(&path).unwrap();
            let mut seed = 11u64;
            let mut rnd = |n: u64| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) % n.max(1)
            };
            while !stop.load(Ordering::Relaxed) {
                let size = f.metadata().unwrap().len();
                match rnd(3) {
                    0 => f.set_len(size - rnd(size / 2)).unwrap(),
                    1 => {
                        let _ = nix::fcntl::fallocate(
                            &f,
                            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                            rnd(size) as i64,
                            (1 + rnd(MIB)) as i64,
                        );
                    }
                    _ => {
                        fs::write(&other, vec![0xee; 2 * MIB as usize]).unwrap();
                        fs::remove_file(&other).unwrap();
                    }
                }
                let data = fs::read(&path).unwrap();
                if let Some(o) = first_foreign_byte(&data) {
                    panic!("a plain read saw byte {:#x} at {o}", data[o]);
                }
                progress.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let args = [
        "race".to_string(),
        "4".to_string(),
        (160 * MIB).to_string(),
        (64 * 1024 + 100).to_string(),
    ];
    let out = run_appender(&exe, &path, &args, Some(&stats));
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
    let rounds = progress.load(Ordering::Relaxed);
    let st = stats_of(&stats);
    eprintln!("append race: {out:?}; other process: {rounds} rounds; {st:?}");
    assert!(out.starts_with("writes "), "{out}");
    assert!(rounds >= 10, "the other process made only {rounds} rounds");
    assert!(
        st.extensions > 0,
        "no append was served, nothing raced: {st:?}"
    );
    let data = fs::read(&path).unwrap();
    assert_eq!(first_foreign_byte(&data), None);
    m.unmount();
}

#[test]
fn killing_an_appender_under_the_library_loses_no_returned_append() {
    // Every append that returned is in the file after the appender and then the daemon
    // are killed (the daemon's recovery at the next mount), with its bytes; what was under
    // way is there whole, in part or not at all, and nothing else is.
    assert!(can_mount());
    let img = Image::new("preload-append-kill9", 512 * MIB);
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "appender", APPENDER_C);
    let bs = 64 * 1024 + 100;
    for round in 0..3u64 {
        let m = Mount::new(&img, "");
        let name = format!("log{round}");
        let path = m.path(&name);
        fs::write(&path, (0..3 * MIB).map(appended).collect::<Vec<u8>>()).unwrap();
        let mut cmd = Command::new(&exe);
        cmd.arg(&path)
            .arg("kill")
            .arg(bs.to_string())
            .env("LD_PRELOAD", library());
        let kill_at = Instant::now() + Duration::from_millis(200 + 300 * round);
        let acked = kill_writer(cmd, kill_at, 200 * MIB);
        assert!(
            acked > 3 * MIB + 10 * bs,
            "round {round}: only up to {acked}"
        );
        kill_daemon(m);
        let m = Mount::new(&img, "");
        let data = fs::read(m.path(&name)).unwrap();
        let len = data.len() as u64;
        assert!(
            len >= acked && len <= acked + bs,
            "round {round}: {len} bytes, appends returned up to {acked}"
        );
        let bad = data
            .iter()
            .enumerate()
            .find(|&(o, &b)| b != appended(o as u64) && (o as u64) < acked);
        assert_eq!(
            bad.map(|(o, _)| o),
            None,
            "round {round}: a returned byte lost"
        );
        assert_eq!(first_foreign_byte(&data), None, "round {round}");
        fs::remove_file(m.path(&name)).unwrap();
        m.unmount();
    }
}

#[test]
fn threads_appending_past_each_other_lose_no_byte() {
    // Four threads pwrite 64 KiB + 100 byte appends, each claiming the range after the last
    // one claimed, all at once. An extension zeroes the gap between the old end of file and
    // its range, so an append extended before an earlier range's must never leave that
    // earlier one's bytes zeroed: every byte must be what was written, none zero.
    assert!(can_mount());
    let img = Image::new("preload-append-threads", 512 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile_c(tmp.path(), "appender", APPENDER_C);
    let stats = tmp.path().join("stats");
    for round in 0..3 {
        let path = m.path(&format!("shared{round}"));
        fs::write(&path, (0..3 * MIB).map(appended).collect::<Vec<u8>>()).unwrap();
        let bs = 64 * 1024 + 100;
        let max = 48 * MIB;
        let args = [
            "threads".to_string(),
            "4".to_string(),
            max.to_string(),
            bs.to_string(),
        ];
        let out = run_appender(&exe, &path, &args, Some(&stats));
        let end: u64 = out.trim().strip_prefix("end ").unwrap().parse().unwrap();
        let data = fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, end, "round {round}");
        let bad = data
            .iter()
            .enumerate()
            .find(|&(o, &b)| b != appended(o as u64));
        assert_eq!(
            bad.map(|(o, &b)| (o, b)),
            None,
            "round {round}: (offset, byte) not what a thread wrote there"
        );
    }
    let st = stats_of(&stats);
    eprintln!("threads appending: {st:?}");
    // Appends of one open file are made one at a time: none makes another's extension
    // fail, so nearly all are served (interleaved, they were 1-2%: each refused extension
    // went through the kernel and moved the generation again).
    let writes = 3 * (45 * MIB).div_ceil(64 * 1024 + 100);
    assert!(
        st.served_writes * 2 >= writes && st.extensions > 0,
        "{writes} writes: {st:?}"
    );
    m.unmount();
}

/// Faults a file's first LEN bytes in through a kernel mapping, over and over for SECS:
/// each round drops the file's cached pages (`POSIX_FADV_DONTNEED`), maps them and reads a
/// byte of every page, so the kernel keeps sending READs while it holds those pages locked.
/// Usage: `faulter PATH SECS LEN`; prints `rounds R pages P`.
const FAULTER_C: &str = r#"
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    CHECK(argc == 4);
    int fd = open(argv[1], O_RDONLY);
    CHECK(fd >= 0);
    double stop = now() + atof(argv[2]);
    long len = atol(argv[3]), rounds = 0, pages = 0;
    unsigned long long sum = 0;
    while (now() < stop) {
        CHECK(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
        volatile unsigned char *p = mmap(0, len, PROT_READ, MAP_SHARED, fd, 0);
        CHECK(p != MAP_FAILED);
        for (long o = 0; o < len; o += 4096) sum += p[o];
        CHECK(munmap((void *)p, len) == 0);
        rounds++;
        pages += len / 4096;
    }
    printf("rounds %ld pages %ld (%llu)\n", rounds, pages, sum & 1);
    return 0;
}
"#;

#[test]
fn served_appends_racing_kernel_mapping_faults_never_hang_the_mount() {
    // A served append's ALLOCATE and EXTEND change the file behind the kernel, so their
    // replies wait until the kernel has dropped the file's pages. Dropping a page waits for
    // its lock, and a fault holds that lock until its READ is answered. With the wait on a
    // session thread, the only session thread waited for a READ only it could serve:
    // xfstests generic/095 hung so (two threads, both waiting). One session thread here,
    // appends under the library and kernel-mapping faults of the same file from another
    // process: both must finish (the watchdog is run_bounded's deadline).
    assert!(can_mount());
    let img = Image::new("preload-append-faults", 512 * MIB);
    let m = Mount::new(&img, "threads=1");
    let tmp = tempfile::tempdir().unwrap();
    let appender = compile_c(tmp.path(), "appender", APPENDER_C);
    let faulter = compile_c(tmp.path(), "faulter", FAULTER_C);
    let path = m.path("appended");
    fs::write(&path, (0..3 * MIB).map(appended).collect::<Vec<u8>>()).unwrap();
    let stats = tmp.path().join("stats");
    // The appender truncates the file back to 2-3 MiB whenever it passes 8 MiB, so the
    // faulter maps only the first 2 MiB: never past the end of file.
    let faulting = {
        let (faulter, path) = (faulter.clone(), path.clone());
        std::thread::spawn(move || {
            let len = (2 * MIB).to_string();
            let args = [path.as_path(), Path::new("4"), Path::new(&len)];
            run_bounded(&faulter, &args, None)
        })
    };
    let args = [
        "race".to_string(),
        "3".to_string(),
        (400 * MIB).to_string(),
        (16 * 1024 + 100).to_string(),
    ];
    let out = run_appender(&appender, &path, &args, Some(&stats));
    let faulted = faulting.join().unwrap();
    let st = stats_of(&stats);
    eprintln!("appends racing faults: appender {out:?}; faulter {faulted:?}; {st:?}");
    assert!(out.starts_with("writes "), "{out}");
    let rounds: u64 = faulted
        .strip_prefix("rounds ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("faulter: {faulted}"));
    assert!(rounds >= 10, "the faulter made only {rounds} rounds");
    assert!(
        st.allocations > 0 && st.extensions > 0,
        "nothing served: {st:?}"
    );
    let data = fs::read(&path).unwrap();
    assert_eq!(first_foreign_byte(&data), None);
    m.unmount();
}

#[test]
fn served_reads_and_mappings_update_the_access_time_as_the_mount_does() {
    // relatime (the default): a read makes the access time due when it is not after the
    // modification time. cat under the library is served and must leave the same access
    // time behind as without it (xfstests generic/003 saw it unchanged); a second read
    // without a change asks the daemon nothing more.
    assert!(can_mount());
    let img = Image::new("preload-atime", 256 * MIB);
    let m = Mount::new(&img, "");
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats");
    use std::os::unix::fs::MetadataExt;
    for preload in [false, true] {
        let path = m.path(&format!("read-{preload}"));
        fs::write(&path, pattern(5, (3 * MIB) as usize)).unwrap();
        // An access time a minute before the modification time: due at the next read.
        let mtime = fs::metadata(&path).unwrap().mtime();
        let old = nix::sys::time::TimeSpec::new(mtime - 60, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &path,
            &old,
            &nix::sys::time::TimeSpec::UTIME_OMIT,
            nix::sys::stat::UtimensatFlags::FollowSymlink,
        )
        .unwrap();
        assert_eq!(fs::metadata(&path).unwrap().atime(), mtime - 60);
        let mut cmd = Command::new("cat");
        cmd.arg(&path).stdout(Stdio::null());
        if preload {
            cmd.env("LD_PRELOAD", library())
                .env("PMFS_DIRECT_STATS", &stats);
        }
        assert!(cmd.status().unwrap().success());
        let atime = fs::metadata(&path).unwrap().atime();
        assert!(
            atime >= mtime,
            "preloaded {preload}: the access time stayed at {atime} (modified at {mtime})"
        );
    }
    let st = fs::read_to_string(&stats).unwrap();
    let get = |k: &str| -> u64 {
        let w: Vec<&str> = st.split_whitespace().collect();
        let i = w.iter().position(|x| *x == k).unwrap();
        w[i + 1].parse().unwrap()
    };
    assert!(get("served_reads") > 1, "cat was not served: {st}");
    assert_eq!(
        get("atime_stamps"),
        1,
        "one stamp for a file that did not change: {st}"
    );
    m.unmount();
}
