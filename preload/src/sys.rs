//! Every `unsafe` line of the preload library: the exported interposers, the look-ups of
//! the real libc functions, raw buffers, errno, and the constructor.
//!
//! Rules every interposer follows:
//! - A call made while this thread is already inside the library (the library's own file
//!   I/O, `dlsym`, Rust's std) goes straight to the real function: [`Inside`].
//! - errno: the library's own work may fail quietly; errno is saved before it and restored
//!   after, so a served call leaves errno as it found it (as a successful real call does)
//!   and a real call starts from the caller's errno.
//! - The variadic `open`/`openat`/`fcntl` are declared with their optional argument as a
//!   plain third/fourth integer parameter: on the Linux x86-64 and AArch64 C ABIs a variadic
//!   integer or pointer argument travels in the same register as a named one, and a caller
//!   that passed none leaves an unused register behind (read, never used, when no O_CREAT
//!   or O_TMPFILE asks for a mode).
//! - glibc's stdio (fopen, fread, fwrite) calls its internal `__read`/`__write`/`__open`,
//!   which cannot be interposed: stdio streams are never tracked and are served by the
//!   kernel as without the library. `fclose` is interposed only to end the tracking of an
//!   fd that `fdopen` wrapped.

#![allow(
    unsafe_code,
    reason = "the preload library's FFI: exported interposers, dlsym, raw buffers, errno"
)]

use libc::{c_char, c_int, c_uint, c_ulong, c_void, iovec, mode_t, off_t, size_t, ssize_t};
use std::cell::Cell;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// This thread runs library code: calls it makes into interposed functions go to libc.
struct Inside;

impl Inside {
    /// `None` when the thread is inside already (or its thread-locals are gone).
    fn enter() -> Option<Inside> {
        INSIDE
            .try_with(|c| (!c.replace(true)).then_some(Inside))
            .ok()
            .flatten()
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|c| c.set(false));
    }
}

fn errno() -> c_int {
    // SAFETY: `__errno_location` returns this thread's errno, valid for its lifetime.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e }
}

/// Runs library work `f` (not when the thread is inside already), keeping errno.
fn library<R>(f: impl FnOnce() -> R) -> Option<R> {
    let guard = Inside::enter()?;
    let saved = errno();
    let r = f();
    set_errno(saved);
    drop(guard);
    Some(r)
}

/// Resolves the next definition of `name` (NUL-terminated) after this library.
fn next_symbol(cache: &AtomicUsize, name: &'static [u8]) -> usize {
    let p = cache.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    let _inside = Inside::enter(); // dlsym may allocate or open files
    // SAFETY: `name` is a NUL-terminated symbol name (every caller passes a literal ending
    // in "\0"); RTLD_NEXT looks it up in the objects loaded after this one.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast::<c_char>()) } as usize;
    cache.store(p, Ordering::Relaxed);
    p
}

/// Declares `real_NAME`, calling the next definition of `NAME`: `ENOSYS` when there is none.
macro_rules! real {
    ($real:ident, $name:literal, fn($($arg:ident: $ty:ty),*) -> $ret:ty, $fail:expr) => {
        #[allow(clippy::unused_unit, reason = "closefrom returns void")]
        fn $real($($arg: $ty),*) -> $ret {
            static CACHE: AtomicUsize = AtomicUsize::new(0);
            let p = next_symbol(&CACHE, concat!($name, "\0").as_bytes());
            if p == 0 {
                set_errno(libc::ENOSYS);
                return $fail;
            }
            // SAFETY: `p` is the address of libc's `$name`, whose C type is the one
            // spelled here (checked against the glibc headers); the arguments are passed
            // through unchanged from our caller, who owes them the same contract.
            let f: unsafe extern "C" fn($($ty),*) -> $ret = unsafe { std::mem::transmute(p) };
            // SAFETY: as above.
            unsafe { f($($arg),*) }
        }
    };
}

real!(
    real_open,
    "open",
    fn(p: *const c_char, f: c_int, m: mode_t) -> c_int,
    -1
);
real!(
    real_open64,
    "open64",
    fn(p: *const c_char, f: c_int, m: mode_t) -> c_int,
    -1
);
real!(
    real_openat,
    "openat",
    fn(d: c_int, p: *const c_char, f: c_int, m: mode_t) -> c_int,
    -1
);
real!(
    real_openat64,
    "openat64",
    fn(d: c_int, p: *const c_char, f: c_int, m: mode_t) -> c_int,
    -1
);
real!(
    real_open_2,
    "__open_2",
    fn(p: *const c_char, f: c_int) -> c_int,
    -1
);
real!(
    real_open64_2,
    "__open64_2",
    fn(p: *const c_char, f: c_int) -> c_int,
    -1
);
real!(
    real_openat_2,
    "__openat_2",
    fn(d: c_int, p: *const c_char, f: c_int) -> c_int,
    -1
);
real!(
    real_openat64_2,
    "__openat64_2",
    fn(d: c_int, p: *const c_char, f: c_int) -> c_int,
    -1
);
real!(
    real_creat,
    "creat",
    fn(p: *const c_char, m: mode_t) -> c_int,
    -1
);
real!(
    real_creat64,
    "creat64",
    fn(p: *const c_char, m: mode_t) -> c_int,
    -1
);
real!(
    real_read,
    "read",
    fn(fd: c_int, b: *mut c_void, n: size_t) -> ssize_t,
    -1
);
real!(
    real_pread,
    "pread",
    fn(fd: c_int, b: *mut c_void, n: size_t, o: off_t) -> ssize_t,
    -1
);
real!(
    real_pread64,
    "pread64",
    fn(fd: c_int, b: *mut c_void, n: size_t, o: off_t) -> ssize_t,
    -1
);
real!(
    real_readv,
    "readv",
    fn(fd: c_int, v: *const iovec, n: c_int) -> ssize_t,
    -1
);
real!(
    real_preadv,
    "preadv",
    fn(fd: c_int, v: *const iovec, n: c_int, o: off_t) -> ssize_t,
    -1
);
real!(
    real_preadv64,
    "preadv64",
    fn(fd: c_int, v: *const iovec, n: c_int, o: off_t) -> ssize_t,
    -1
);
real!(
    real_write,
    "write",
    fn(fd: c_int, b: *const c_void, n: size_t) -> ssize_t,
    -1
);
real!(
    real_pwrite,
    "pwrite",
    fn(fd: c_int, b: *const c_void, n: size_t, o: off_t) -> ssize_t,
    -1
);
real!(
    real_pwrite64,
    "pwrite64",
    fn(fd: c_int, b: *const c_void, n: size_t, o: off_t) -> ssize_t,
    -1
);
real!(
    real_writev,
    "writev",
    fn(fd: c_int, v: *const iovec, n: c_int) -> ssize_t,
    -1
);
real!(
    real_pwritev,
    "pwritev",
    fn(fd: c_int, v: *const iovec, n: c_int, o: off_t) -> ssize_t,
    -1
);
real!(
    real_pwritev64,
    "pwritev64",
    fn(fd: c_int, v: *const iovec, n: c_int, o: off_t) -> ssize_t,
    -1
);
real!(
    real_lseek,
    "lseek",
    fn(fd: c_int, o: off_t, w: c_int) -> off_t,
    -1
);
real!(real_fsync, "fsync", fn(fd: c_int) -> c_int, -1);
real!(real_fdatasync, "fdatasync", fn(fd: c_int) -> c_int, -1);
real!(real_close, "close", fn(fd: c_int) -> c_int, -1);
real!(
    real_close_range,
    "close_range",
    fn(a: c_uint, b: c_uint, f: c_int) -> c_int,
    -1
);
real!(real_closefrom, "closefrom", fn(fd: c_int) -> (), ());
real!(
    real_fclose,
    "fclose",
    fn(f: *mut libc::FILE) -> c_int,
    libc::EOF
);
real!(real_dup, "dup", fn(fd: c_int) -> c_int, -1);
real!(real_dup2, "dup2", fn(a: c_int, b: c_int) -> c_int, -1);
real!(
    real_dup3,
    "dup3",
    fn(a: c_int, b: c_int, f: c_int) -> c_int,
    -1
);
real!(
    real_fcntl,
    "fcntl",
    fn(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int,
    -1
);
real!(
    real_fcntl64,
    "fcntl64",
    fn(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int,
    -1
);
real!(
    real_mmap,
    "mmap",
    fn(a: *mut c_void, n: size_t, p: c_int, f: c_int, fd: c_int, o: off_t) -> *mut c_void,
    libc::MAP_FAILED
);
real!(
    real_mmap64,
    "mmap64",
    fn(a: *mut c_void, n: size_t, p: c_int, f: c_int, fd: c_int, o: off_t) -> *mut c_void,
    libc::MAP_FAILED
);
real!(
    real_munmap,
    "munmap",
    fn(a: *mut c_void, n: size_t) -> c_int,
    -1
);
real!(
    real_mremap,
    "mremap",
    fn(a: *mut c_void, o: size_t, n: size_t, f: c_int, na: *mut c_void) -> *mut c_void,
    libc::MAP_FAILED
);
real!(
    real_mprotect,
    "mprotect",
    fn(a: *mut c_void, n: size_t, p: c_int) -> c_int,
    -1
);
real!(
    real_madvise,
    "madvise",
    fn(a: *mut c_void, n: size_t, advice: c_int) -> c_int,
    -1
);
real!(
    real_msync,
    "msync",
    fn(a: *mut c_void, n: size_t, f: c_int) -> c_int,
    -1
);
real!(
    real_sendfile,
    "sendfile",
    fn(o: c_int, i: c_int, off: *mut off_t, n: size_t) -> ssize_t,
    -1
);
real!(
    real_sendfile64,
    "sendfile64",
    fn(o: c_int, i: c_int, off: *mut off_t, n: size_t) -> ssize_t,
    -1
);
real!(
    real_copy_file_range,
    "copy_file_range",
    fn(i: c_int, io: *mut off_t, o: c_int, oo: *mut off_t, n: size_t, f: c_uint) -> ssize_t,
    -1
);

// ---- helpers for the logic in lib.rs (called inside the library) ----

/// `statfs.f_type` of the file system `fd` lives on.
pub(crate) fn fstatfs_type(fd: c_int) -> Option<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `st` is a writable statfs buffer for the duration of the call.
    let r = unsafe { libc::fstatfs(fd, st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so it filled `st` (which was zeroed anyway).
    let st = unsafe { st.assume_init() };
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is __fsword_t: i64 on x86-64, narrower on some other targets"
    )]
    Some(i64::from(st.f_type))
}

/// The soft limit of open files (RLIMIT_NOFILE), if it can be read.
pub(crate) fn open_file_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a writable rlimit for the duration of the call.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}

/// A close-on-exec duplicate of `fd`, owned.
pub(crate) fn dup_cloexec(fd: c_int) -> std::io::Result<File> {
    let new = real_fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a descriptor fcntl just created for us; nobody else owns it.
    Ok(unsafe { File::from_raw_fd(new) })
}

pub(crate) fn lseek(fd: c_int, off: i64, whence: c_int) -> Option<i64> {
    let r = real_lseek(fd, off, whence);
    (r >= 0).then_some(r)
}

/// Writes `line` to stderr with the real write (no tracking, no allocation).
pub(crate) fn stderr_line(line: &str) {
    real_write(2, line.as_ptr().cast::<c_void>(), line.len());
}

/// The bytes of a read buffer.
///
/// # Safety
/// `buf..buf + n` must be writable memory that nothing else accesses during the call, as
/// read(2)'s caller promises the kernel.
unsafe fn out_buf<'a>(buf: *mut c_void, n: size_t) -> Option<&'a mut [u8]> {
    if buf.is_null() || n > isize::MAX as usize {
        return None;
    }
    // SAFETY: the caller's promise.
    Some(unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), n) })
}

/// The bytes of a write buffer.
///
/// # Safety
/// `buf..buf + n` must be readable, as write(2)'s caller promises the kernel.
unsafe fn in_buf<'a>(buf: *const c_void, n: size_t) -> Option<&'a [u8]> {
    if buf.is_null() || n > isize::MAX as usize {
        return None;
    }
    // SAFETY: the caller's promise.
    Some(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n) })
}

/// The buffers of a readv; `None` for more than a few (left to the kernel).
///
/// # Safety
/// `iov` must point to `n` iovecs whose buffers are writable, as readv(2)'s caller promises.
unsafe fn out_bufs<'a>(iov: *const iovec, n: c_int) -> Option<Vec<&'a mut [u8]>> {
    let n = usize::try_from(n).ok().filter(|&n| n > 0 && n <= 64)?;
    if iov.is_null() {
        return None;
    }
    // SAFETY: the caller's promise: `n` iovecs at `iov`.
    let v = unsafe { std::slice::from_raw_parts(iov, n) };
    // SAFETY: each iovec describes a writable buffer (the caller's promise).
    v.iter()
        .map(|e| unsafe { out_buf(e.iov_base, e.iov_len) })
        .collect()
}

fn served(n: usize) -> ssize_t {
    n as ssize_t
}

// ---- the interposers ----

fn after_open(fd: c_int, flags: c_int) -> c_int {
    if fd >= 0 {
        library(|| crate::opened(fd, flags));
    }
    fd
}

/// # Safety
/// As open(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    after_open(real_open(path, flags, mode), flags)
}

/// # Safety
/// As open(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    after_open(real_open64(path, flags, mode), flags)
}

/// # Safety
/// As openat(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat(
    dir: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    after_open(real_openat(dir, path, flags, mode), flags)
}

/// # Safety
/// As openat(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat64(
    dir: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    after_open(real_openat64(dir, path, flags, mode), flags)
}

/// # Safety
/// As open(2) (the fortified entry point).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    after_open(real_open_2(path, flags), flags)
}

/// # Safety
/// As open(2) (the fortified entry point).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    after_open(real_open64_2(path, flags), flags)
}

/// # Safety
/// As openat(2) (the fortified entry point).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat_2(dir: c_int, path: *const c_char, flags: c_int) -> c_int {
    after_open(real_openat_2(dir, path, flags), flags)
}

/// # Safety
/// As openat(2) (the fortified entry point).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat64_2(dir: c_int, path: *const c_char, flags: c_int) -> c_int {
    after_open(real_openat64_2(dir, path, flags), flags)
}

/// # Safety
/// As creat(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    after_open(
        real_creat(path, mode),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
    )
}

/// # Safety
/// As creat(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    after_open(
        real_creat64(path, mode),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
    )
}

/// # Safety
/// As read(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: read(2)'s contract on `buf`.
    let served_n = library(|| unsafe { out_buf(buf, n) }.and_then(|b| crate::read(fd, b)));
    match served_n.flatten() {
        Some(k) => served(k),
        None => real_read(fd, buf, n),
    }
}

/// # Safety
/// As read(2) (the fortified entry point: `buflen` is the buffer's size).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // What glibc's own check does.
        // SAFETY: always safe to call.
        unsafe { libc::abort() }
    }
    // SAFETY: as read(2).
    unsafe { read(fd, buf, n) }
}

fn pread_common(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off_t,
    real: fn(c_int, *mut c_void, size_t, off_t) -> ssize_t,
) -> ssize_t {
    // SAFETY: pread(2)'s contract on `buf` (our exported callers are bound by it).
    let served_n = library(|| unsafe { out_buf(buf, n) }.and_then(|b| crate::pread(fd, b, off)));
    match served_n.flatten() {
        Some(k) => served(k),
        None => real(fd, buf, n, off),
    }
}

/// # Safety
/// As pread(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t {
    pread_common(fd, buf, n, off, real_pread)
}

/// # Safety
/// As pread(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t {
    pread_common(fd, buf, n, off, real_pread64)
}

/// # Safety
/// As pread(2) (the fortified entry point).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __pread64_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: always safe to call.
        unsafe { libc::abort() }
    }
    pread_common(fd, buf, n, off, real_pread64)
}

/// # Safety
/// As pread(2) (the fortified entry point).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __pread_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: always safe to call.
        unsafe { libc::abort() }
    }
    pread_common(fd, buf, n, off, real_pread)
}

/// # Safety
/// As readv(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: readv(2)'s contract on `iov`.
    let r = library(|| unsafe { out_bufs(iov, n) }.and_then(|mut b| crate::readv(fd, &mut b)));
    match r.flatten() {
        Some(k) => served(k),
        None => real_readv(fd, iov, n),
    }
}

fn preadv_common(
    fd: c_int,
    iov: *const iovec,
    n: c_int,
    off: off_t,
    real: fn(c_int, *const iovec, c_int, off_t) -> ssize_t,
) -> ssize_t {
    // SAFETY: preadv(2)'s contract on `iov` (our exported callers are bound by it).
    let r =
        library(|| unsafe { out_bufs(iov, n) }.and_then(|mut b| crate::preadv(fd, &mut b, off)));
    match r.flatten() {
        Some(k) => served(k),
        None => real(fd, iov, n, off),
    }
}

/// # Safety
/// As preadv(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv(fd: c_int, iov: *const iovec, n: c_int, off: off_t) -> ssize_t {
    preadv_common(fd, iov, n, off, real_preadv)
}

/// # Safety
/// As preadv(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn preadv64(fd: c_int, iov: *const iovec, n: c_int, off: off_t) -> ssize_t {
    preadv_common(fd, iov, n, off, real_preadv64)
}

/// # Safety
/// As write(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: write(2)'s contract on `buf`.
    let r = library(|| unsafe { in_buf(buf, n) }.and_then(|b| crate::write(fd, b)));
    match r.flatten() {
        Some(k) => served(k),
        None => real_write(fd, buf, n),
    }
}

fn pwrite_common(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    off: off_t,
    real: fn(c_int, *const c_void, size_t, off_t) -> ssize_t,
) -> ssize_t {
    // SAFETY: pwrite(2)'s contract on `buf` (our exported callers are bound by it).
    let r = library(|| unsafe { in_buf(buf, n) }.and_then(|b| crate::pwrite(fd, b, off)));
    match r.flatten() {
        Some(k) => served(k),
        None => real(fd, buf, n, off),
    }
}

/// # Safety
/// As pwrite(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    pwrite_common(fd, buf, n, off, real_pwrite)
}

/// # Safety
/// As pwrite(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    pwrite_common(fd, buf, n, off, real_pwrite64)
}

/// Calls this library does not serve, on an fd it may track: served writes are stamped
/// first (see `Tracked::settle`), then libc does the call.
fn unserved(fd: c_int) {
    library(|| crate::settle(fd));
}

/// # Safety
/// As writev(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    unserved(fd);
    real_writev(fd, iov, n)
}

/// # Safety
/// As pwritev(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev(fd: c_int, iov: *const iovec, n: c_int, off: off_t) -> ssize_t {
    unserved(fd);
    real_pwritev(fd, iov, n, off)
}

/// # Safety
/// As pwritev(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev64(fd: c_int, iov: *const iovec, n: c_int, off: off_t) -> ssize_t {
    unserved(fd);
    real_pwritev64(fd, iov, n, off)
}

/// # Safety
/// As fsync(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    unserved(fd);
    real_fsync(fd)
}

/// # Safety
/// As fdatasync(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    unserved(fd);
    real_fdatasync(fd)
}

fn mmap_common(
    a: *mut c_void,
    n: size_t,
    p: c_int,
    f: c_int,
    fd: c_int,
    o: off_t,
    real: fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void,
) -> *mut c_void {
    let fixed = f & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0;
    if f & libc::MAP_ANONYMOUS == 0
        && let Some(Some(addr)) = library(|| crate::maps::mmap(fixed, n, p, f, fd, o))
    {
        return addr as *mut c_void;
    }
    let r = real(a, n, p, f, fd, o);
    if r != libc::MAP_FAILED && fixed {
        // What was mapped there (perhaps part of a served mapping) is gone.
        library(|| crate::maps::replaced(r as usize, n));
    }
    r
}

/// # Safety
/// As mmap(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    a: *mut c_void,
    n: size_t,
    p: c_int,
    f: c_int,
    fd: c_int,
    o: off_t,
) -> *mut c_void {
    mmap_common(a, n, p, f, fd, o, real_mmap)
}

/// # Safety
/// As mmap(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    a: *mut c_void,
    n: size_t,
    p: c_int,
    f: c_int,
    fd: c_int,
    o: off_t,
) -> *mut c_void {
    mmap_common(a, n, p, f, fd, o, real_mmap64)
}

/// # Safety
/// As munmap(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(a: *mut c_void, n: size_t) -> c_int {
    let real = || real_munmap(a, n);
    match library(|| crate::maps::munmap(a as usize, n, real)) {
        Some(r) => r,
        None => real(),
    }
}

/// # Safety
/// As mremap(2) (`new_addr` is read only with MREMAP_FIXED, as the kernel does).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let real = || real_mremap(old, old_len, new_len, flags, new_addr) as usize;
    let unmap = || real_munmap(old, old_len);
    let r = library(|| {
        crate::maps::mremap(
            old as usize,
            old_len,
            new_len,
            flags,
            new_addr as usize,
            real,
            unmap,
        )
    });
    match r {
        Some(Ok(addr)) => addr as *mut c_void,
        Some(Err(e)) => {
            set_errno(e);
            libc::MAP_FAILED
        }
        None => real_mremap(old, old_len, new_len, flags, new_addr),
    }
}

/// # Safety
/// As mprotect(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mprotect(a: *mut c_void, n: size_t, p: c_int) -> c_int {
    if let Some(Some(e)) = library(|| crate::maps::mprotect_refused(a as usize, n, p)) {
        set_errno(e);
        return -1;
    }
    real_mprotect(a, n, p)
}

/// # Safety
/// As madvise(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn madvise(a: *mut c_void, n: size_t, advice: c_int) -> c_int {
    if let Some(Some(e)) = library(|| crate::maps::madvise_refused(a as usize, n, advice)) {
        set_errno(e);
        return -1;
    }
    real_madvise(a, n, advice)
}

/// # Safety
/// As msync(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn msync(a: *mut c_void, n: size_t, f: c_int) -> c_int {
    // SAFETY: `maps::msync` passes only byte ranges of a served mapping that are still
    // mapped: it updates those ranges under the same lock, held here, as every munmap,
    // shrinking mremap and fixed mapping the program makes through libc.
    let persist =
        |h: &pmfs::dax::HandedMapping, at: usize, len: usize| unsafe { h.persist(at, len) };
    let real = |start: usize, len: usize| {
        if real_msync(start as *mut c_void, len, f) == 0 {
            0
        } else {
            errno()
        }
    };
    match library(|| crate::maps::msync(a as usize, n, f, persist, real)).flatten() {
        Some(Ok(())) => 0,
        Some(Err(e)) => {
            set_errno(e);
            -1
        }
        None => real_msync(a, n, f),
    }
}

/// # Safety
/// As sendfile(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    unserved(inp);
    unserved(out);
    real_sendfile(out, inp, off, n)
}

/// # Safety
/// As sendfile(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile64(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    unserved(inp);
    unserved(out);
    real_sendfile64(out, inp, off, n)
}

/// # Safety
/// As copy_file_range(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn copy_file_range(
    i: c_int,
    io: *mut off_t,
    o: c_int,
    oo: *mut off_t,
    n: size_t,
    f: c_uint,
) -> ssize_t {
    unserved(i);
    unserved(o);
    real_copy_file_range(i, io, o, oo, n, f)
}

/// # Safety
/// As close(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    library(|| crate::closing(fd));
    real_close(fd)
}

/// # Safety
/// As close_range(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        library(|| crate::closing_range(first, last));
    }
    real_close_range(first, last, flags)
}

/// # Safety
/// As closefrom(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(low: c_int) {
    if let Ok(first) = c_uint::try_from(low) {
        library(|| crate::closing_range(first, c_uint::MAX));
    }
    real_closefrom(low)
}

/// # Safety
/// As fclose(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fclose(stream: *mut libc::FILE) -> c_int {
    if !stream.is_null() {
        // SAFETY: `stream` is an open stream (fclose's contract); fileno only reads it.
        let fd = unsafe { libc::fileno(stream) };
        if fd >= 0 {
            library(|| crate::closing(fd));
        }
    }
    real_fclose(stream)
}

/// # Safety
/// As dup(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let new = real_dup(fd);
    if new >= 0 {
        library(|| crate::duplicated(fd, new));
    }
    new
}

/// # Safety
/// As dup2(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let r = real_dup2(old, new);
    if r >= 0 {
        library(|| crate::duplicated(old, r));
    }
    r
}

/// # Safety
/// As dup3(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let r = real_dup3(old, new, flags);
    if r >= 0 {
        library(|| crate::duplicated(old, r));
    }
    r
}

fn after_fcntl(fd: c_int, cmd: c_int, arg: c_ulong, r: c_int) -> c_int {
    if r >= 0 {
        match cmd {
            libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
                library(|| crate::duplicated(fd, r));
            }
            libc::F_SETFL => {
                library(|| crate::status_set(fd, arg as c_int));
            }
            _ => {}
        }
    }
    r
}

/// # Safety
/// As fcntl(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    after_fcntl(fd, cmd, arg, real_fcntl(fd, cmd, arg))
}

/// # Safety
/// As fcntl(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    after_fcntl(fd, cmd, arg, real_fcntl64(fd, cmd, arg))
}

// ---- constructor, fork and exit ----

thread_local! {
    /// The served-mappings lock, held by the forking thread across a fork.
    static FORK_HOLD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, Vec<crate::maps::Served>>>> =
        const { std::cell::RefCell::new(None) };
}

extern "C" fn at_fork_prepare() {
    crate::forking();
    library(|| {
        let held = crate::maps::fork_prepare();
        let _ = FORK_HOLD.try_with(|h| *h.borrow_mut() = held);
    });
}

/// After a fork, in the parent and in the child: the lock taken by the prepare handler.
extern "C" fn at_fork_done() {
    library(|| {
        let _ = FORK_HOLD.try_with(|h| h.borrow_mut().take());
    });
}

extern "C" fn at_exit() {
    library(crate::report_stats);
}

extern "C" fn constructor() {
    library(|| {
        crate::init();
        // SAFETY: registering plain `extern "C"` functions that live as long as the
        // process (a preloaded library is never unloaded).
        unsafe {
            libc::pthread_atfork(
                Some(at_fork_prepare),
                Some(at_fork_done),
                Some(at_fork_done),
            );
            libc::atexit(at_exit);
        }
    });
}

/// Runs [`constructor`] when the library is loaded.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = constructor;
