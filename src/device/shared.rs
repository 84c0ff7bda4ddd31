//! A shared mapping of a file that other parties change while it is mapped (the kernel, other
//! processes, other threads): touched only through volatile 8-byte loads and stores, never
//! through references, so nothing in it is ever assumed not to change. Used by the tests
//! that race stores through a mapping against write(2).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// A `MAP_SHARED` mapping of a whole file (its length when mapped).
#[derive(Debug)]
pub struct SharedFileMapping {
    map: memmap2::MmapRaw,
}

impl SharedFileMapping {
    /// Maps all of `file` (opened read-write) shared.
    pub fn map(file: &File) -> io::Result<Self> {
        Ok(Self {
            map: memmap2::MmapRaw::map_raw(file)?,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The 8-byte word at byte `at` (8-aligned, inside the mapping; panics otherwise).
    pub fn load_u64(&self, at: usize) -> u64 {
        self.check(at);
        // SAFETY: `check` proved `at..at + 8` inside the live mapping and `at` 8-aligned (the
        // mapping itself is page-aligned); the access is volatile and makes no reference, so
        // concurrent stores by others to this or any byte alias nothing of ours.
        unsafe { self.map.as_ptr().add(at).cast::<u64>().read_volatile() }
    }

    /// Stores the 8-byte word `v` at byte `at` (8-aligned, inside the mapping).
    pub fn store_u64(&self, at: usize, v: u64) {
        self.check(at);
        // SAFETY: as in `load_u64`: in bounds, aligned, volatile, no reference made.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(at)
                .cast::<u64>()
                .write_volatile(v)
        }
    }

    /// The 8-byte word at byte `at`, loaded atomically with acquire ordering: loads after it
    /// see at least what the process that stored the word with [`Self::store_u64_release`]
    /// stored before it (a seqlock's sequence word).
    pub fn load_u64_acquire(&self, at: usize) -> u64 {
        self.check(at);
        // SAFETY: `check` proved `at..at + 8` inside the live mapping and 8-aligned, as
        // `AtomicU64::from_ptr` requires; every party touches these words only through
        // atomic or volatile 8-byte accesses, and the reference lives for this call only.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(at).cast::<u64>()) }
            .load(Ordering::Acquire)
    }

    /// Stores the 8-byte word `v` at byte `at` atomically with release ordering.
    pub fn store_u64_release(&self, at: usize, v: u64) {
        self.check(at);
        // SAFETY: as in `load_u64_acquire`.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(at).cast::<u64>()) }
            .store(v, Ordering::Release)
    }

    /// Adds `delta` (wrapping) to the 8-byte word at byte `at` atomically, sequentially
    /// consistent with every other SeqCst access and fence; returns the old value.
    pub fn fetch_add_u64(&self, at: usize, delta: u64) -> u64 {
        self.check(at);
        // SAFETY: as in `load_u64_acquire`.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(at).cast::<u64>()) }
            .fetch_add(delta, Ordering::SeqCst)
    }

    /// msync(MS_SYNC) of the whole mapping.
    pub fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }

    fn check(&self, at: usize) {
        assert!(
            at % 8 == 0 && at.checked_add(8).is_some_and(|end| end <= self.map.len()),
            "word at {at} is not an aligned word of a {}-byte mapping",
            self.map.len()
        );
    }
}
