//! A device in memory that records every store, flush and fence, for crash testing.
//!
//! The model of a power failure (the one a CPU with ADR gives): a cache line that was stored
//! to and then flushed and fenced is durable; a line stored to since its last fenced flush may
//! or may not have reached the media, independently of every other such line, and if it did,
//! it holds its latest value. Non-temporal stores count as flushed. [`CrashImages`] is the set
//! of images a failure just before a given fence could leave.

use super::{
    CACHE_LINE, DeviceError, Media, PersistenceMode, RESERVE_CHUNK, check_range, check_word,
    chunks_inside, chunks_touching,
};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Event {
    Store { offset: u64, data: Vec<u8> },
    NtStore { offset: u64, data: Vec<u8> },
    Flush { offset: u64, len: u64 },
    Fence,
}

#[derive(Debug)]
struct Inner {
    image: Vec<u8>,
    /// The image when recording started: the durable state before the first event.
    base: Arc<Vec<u8>>,
    events: Vec<Event>,
    recording: bool,
    fences: usize,
    /// Failpoint: flushes that may still succeed before every flush fails (`None`: all
    /// succeed). A failed flush is how a real device reports a media error.
    flushes_left: Option<u64>,
    /// The sparse-image model (`model_sparse`): one flag per [`RESERVE_CHUNK`], set while
    /// the chunk is reserved. `None`: every byte is backed, as on a preallocated image.
    reserved: Option<Vec<bool>>,
    /// Failpoint: reserving a chunk that is not reserved yet fails with
    /// [`DeviceError::NoSpace`] (a full backing store).
    reserve_fails: bool,
}

/// An in-memory [`Media`] that logs stores, flushes and fences.
#[derive(Debug)]
pub struct RecordingDevice {
    inner: Mutex<Inner>,
    size: u64,
}

impl RecordingDevice {
    /// A zeroed device of `size` bytes, not recording.
    pub fn new(size: u64) -> Self {
        Self::from_image(vec![0; usize::try_from(size).unwrap_or(usize::MAX)])
    }

    /// A device holding `image`, not recording.
    pub fn from_image(image: Vec<u8>) -> Self {
        let size = image.len() as u64;
        Self {
            inner: Mutex::new(Inner {
                base: Arc::new(Vec::new()),
                image,
                events: Vec::new(),
                recording: false,
                fences: 0,
                flushes_left: None,
                reserved: None,
                reserve_fails: false,
            }),
            size,
        }
    }

    /// Failpoint: after `n` more successful flushes every flush fails with an I/O error,
    /// until `fail_flushes_after(None)` (tests of fail-stop: a failed commit or rollback).
    pub fn fail_flushes_after(&self, n: Option<u64>) {
        self.inner.lock().flushes_left = n;
    }

    /// From now on the device models a sparse image that is all hole: a store into a
    /// [`RESERVE_CHUNK`] that was not reserved ([`Media::reserve`]) since fails with
    /// [`DeviceError::NotReserved`] (where a real sparse image could raise SIGBUS), and
    /// [`Media::discard`] zeroes chunks and forgets their reservation.
    pub fn model_sparse(&self) {
        let chunks = self.size.div_ceil(RESERVE_CHUNK) as usize;
        self.inner.lock().reserved = Some(vec![false; chunks]);
    }

    /// Failpoint (with [`RecordingDevice::model_sparse`]): while `fail` holds, reserving a
    /// chunk that is not reserved yet fails with [`DeviceError::NoSpace`], as a sparse image
    /// on a full file system does.
    pub fn fail_reserves(&self, fail: bool) {
        self.inner.lock().reserve_fails = fail;
    }

    /// Chunks reserved under the sparse model (0 without it).
    pub fn reserved_chunks(&self) -> usize {
        let g = self.inner.lock();
        g.reserved
            .as_ref()
            .map_or(0, |r| r.iter().filter(|&&x| x).count())
    }

    /// Under the sparse model, fails unless every chunk of `offset..offset + len` is
    /// reserved.
    fn check_reserved(g: &Inner, offset: u64, len: u64) -> Result<(), DeviceError> {
        let Some(reserved) = &g.reserved else {
            return Ok(());
        };
        match chunks_touching(offset, len.max(1))
            .find(|&c| !reserved.get(c as usize).copied().unwrap_or(false))
        {
            Some(c) => Err(DeviceError::NotReserved(offset.max(c * RESERVE_CHUNK))),
            None => Ok(()),
        }
    }

    /// Starts recording: the current image becomes the durable base, the log is emptied.
    pub fn start_recording(&self) {
        let mut g = self.inner.lock();
        g.base = Arc::new(g.image.clone());
        g.events.clear();
        g.fences = 0;
        g.recording = true;
    }

    /// Resumes recording after `stop_recording`, keeping the base and the log. Stores made
    /// while stopped are not in the log: use it only around code that stores nothing.
    pub fn resume_recording(&self) {
        self.inner.lock().recording = true;
    }

    /// Stops recording (the log is kept until the next `start_recording`).
    pub fn stop_recording(&self) {
        self.inner.lock().recording = false;
    }

    /// Fences recorded since `start_recording`.
    pub fn fence_count(&self) -> usize {
        self.inner.lock().fences
    }

    /// A copy of the current (volatile, as every thread sees it) image.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.lock().image.clone()
    }

    /// The crash states of a power failure just before fence number `fence` (0-based) ran;
    /// `fence == fence_count()` means a failure after the last recorded event.
    pub fn crash_images(&self, fence: usize) -> CrashImages {
        let lines = self.crash_lines(fence);
        let mut durable = lines.base.as_ref().clone();
        for (&l, data) in &lines.durable {
            let o = l as usize;
            durable[o..o + data.len()].copy_from_slice(data);
        }
        CrashImages {
            durable,
            pending: lines.pending,
        }
    }

    /// The same crash states as [`RecordingDevice::crash_images`], as lines over the shared
    /// base image instead of whole images: what a crash test of a device of gigabytes can
    /// afford ([`CrashLines::media`]).
    pub fn crash_lines(&self, fence: usize) -> CrashLines {
        let g = self.inner.lock();
        let base = Arc::clone(&g.base);
        // Lines stored to since recording started: line offset -> latest contents.
        let mut current: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut durable: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        // Dirty lines: line offset -> flushed since its last store.
        let mut dirty: BTreeMap<u64, bool> = BTreeMap::new();
        let mut seen = 0usize;
        let line_of = |l: u64| {
            let (s, e) = (l as usize, ((l + CACHE_LINE) as usize).min(base.len()));
            (s, e)
        };
        let apply = |current: &mut BTreeMap<u64, Vec<u8>>, offset: u64, data: &[u8]| {
            let first = offset / CACHE_LINE * CACHE_LINE;
            let end = offset + data.len() as u64;
            let mut l = first;
            while l < end {
                let (s, e) = line_of(l);
                let line = current
                    .entry(l)
                    .or_insert_with(|| base.get(s..e).unwrap_or_default().to_vec());
                let from = offset.max(l);
                let to = end.min(l + CACHE_LINE);
                let src = &data[(from - offset) as usize..(to - offset) as usize];
                line[(from - l) as usize..(to - l) as usize].copy_from_slice(src);
                l += CACHE_LINE;
            }
        };
        let lines = |offset: u64, len: u64| {
            let first = offset / CACHE_LINE * CACHE_LINE;
            (first..offset + len.max(1)).step_by(CACHE_LINE as usize)
        };
        for ev in &g.events {
            match ev {
                Event::Store { offset, data } => {
                    apply(&mut current, *offset, data);
                    for l in lines(*offset, data.len() as u64) {
                        dirty.insert(l, false);
                    }
                }
                Event::NtStore { offset, data } => {
                    apply(&mut current, *offset, data);
                    for l in lines(*offset, data.len() as u64) {
                        dirty.insert(l, true);
                    }
                }
                Event::Flush { offset, len } => {
                    for l in lines(*offset, *len) {
                        if let Some(f) = dirty.get_mut(&l) {
                            *f = true;
                        }
                    }
                }
                Event::Fence => {
                    if seen == fence {
                        break;
                    }
                    seen += 1;
                    dirty.retain(|&l, flushed| {
                        if *flushed {
                            if let Some(line) = current.get(&l) {
                                durable.insert(l, line.clone());
                            }
                        }
                        !*flushed
                    });
                }
            }
        }
        let pending = dirty
            .keys()
            .filter_map(|&l| current.get(&l).map(|line| (l, line.clone())))
            .collect();
        CrashLines {
            base,
            durable,
            pending,
        }
    }

    fn record(&self, g: &mut Inner, ev: Event) {
        if g.recording {
            if matches!(ev, Event::Fence) {
                g.fences += 1;
            }
            g.events.push(ev);
        }
    }

    fn store(&self, offset: u64, data: &[u8], nt: bool) -> Result<(), DeviceError> {
        check_range(offset, data.len() as u64, self.size)?;
        let mut g = self.inner.lock();
        Self::check_reserved(&g, offset, data.len() as u64)?;
        let o = offset as usize;
        g.image[o..o + data.len()].copy_from_slice(data);
        let ev = if nt {
            Event::NtStore {
                offset,
                data: data.to_vec(),
            }
        } else {
            Event::Store {
                offset,
                data: data.to_vec(),
            }
        };
        self.record(&mut g, ev);
        Ok(())
    }

    fn rmw(&self, offset: u64, f: impl FnOnce(u64) -> u64) -> Result<u64, DeviceError> {
        check_word(offset, self.size)?;
        let mut g = self.inner.lock();
        Self::check_reserved(&g, offset, 8)?;
        let o = offset as usize;
        let mut w = [0u8; 8];
        w.copy_from_slice(&g.image[o..o + 8]);
        let old = u64::from_le_bytes(w);
        let new = f(old).to_le_bytes();
        g.image[o..o + 8].copy_from_slice(&new);
        self.record(
            &mut g,
            Event::Store {
                offset,
                data: new.to_vec(),
            },
        );
        Ok(old)
    }
}

/// The images a power failure could leave: `durable` plus any subset of `pending` lines.
#[derive(Debug, Clone)]
pub struct CrashImages {
    pub durable: Vec<u8>,
    /// Cache lines stored to but not durable, with their latest contents.
    pub pending: Vec<(u64, Vec<u8>)>,
}

impl CrashImages {
    /// The image with the pending lines chosen by `take(i)` applied.
    pub fn image_with(&self, mut take: impl FnMut(usize) -> bool) -> Vec<u8> {
        let mut img = self.durable.clone();
        for (i, (off, data)) in self.pending.iter().enumerate() {
            if take(i) {
                let o = *off as usize;
                img[o..o + data.len()].copy_from_slice(data);
            }
        }
        img
    }

    /// Every crash image when there are at most `exhaustive_limit` pending lines (2^n
    /// images); otherwise `samples` images from a deterministic pseudo-random choice, plus
    /// the two extremes (nothing pending persisted, everything persisted).
    pub fn enumerate(&self, exhaustive_limit: usize, samples: usize, seed: u64) -> Vec<Vec<u8>> {
        let n = self.pending.len();
        if n <= exhaustive_limit && n < 20 {
            return (0u64..1 << n)
                .map(|mask| self.image_with(|i| mask & (1 << i) != 0))
                .collect();
        }
        let mut out = vec![self.image_with(|_| false), self.image_with(|_| true)];
        let mut state = seed | 1;
        for _ in 0..samples {
            out.push(self.image_with(|_| {
                // xorshift64: small, deterministic, good enough to pick subsets.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state & 1 == 1
            }));
        }
        out
    }
}

/// A crash state as cache lines over the base image (see [`RecordingDevice::crash_lines`]).
#[derive(Debug, Clone)]
pub struct CrashLines {
    /// The image when recording started.
    pub base: Arc<Vec<u8>>,
    /// Lines durable at the crash, with their contents.
    pub durable: BTreeMap<u64, Vec<u8>>,
    /// Lines stored to but not durable, with their latest contents.
    pub pending: Vec<(u64, Vec<u8>)>,
}

impl CrashLines {
    /// The crash image with the pending lines chosen by `take(i)`, as a device that shares
    /// the base image and keeps only the pages that differ (copy on write).
    pub fn media(&self, mut take: impl FnMut(usize) -> bool) -> OverlayDevice {
        let dev = OverlayDevice {
            base: Arc::clone(&self.base),
            pages: Mutex::new(HashMap::new()),
        };
        let chosen = self
            .pending
            .iter()
            .enumerate()
            .filter(|(i, _)| take(*i))
            .map(|(_, line)| line);
        for (l, data) in self.durable.iter().chain(chosen.map(|(l, d)| (l, d))) {
            dev.put(*l, data);
        }
        dev
    }
}

/// A device over a shared base image that keeps the pages stored into apart (for crash
/// tests of large devices: each crash image costs the pages it changes). Flushes and fences
/// do nothing: it is the state after the crash, not a device that can crash again.
#[derive(Debug)]
pub struct OverlayDevice {
    base: Arc<Vec<u8>>,
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
}

impl OverlayDevice {
    const PAGE: u64 = 4096;

    fn put(&self, offset: u64, data: &[u8]) {
        let mut pages = self.pages.lock();
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let p = at / Self::PAGE;
            let page = pages.entry(p).or_insert_with(|| {
                let s = (p * Self::PAGE) as usize;
                let e = (s + Self::PAGE as usize).min(self.base.len());
                let mut page = vec![0u8; Self::PAGE as usize];
                page[..e - s].copy_from_slice(&self.base[s..e]);
                page.into_boxed_slice()
            });
            let in_page = (at % Self::PAGE) as usize;
            let n = (Self::PAGE as usize - in_page).min(data.len() - done);
            page[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    fn get(&self, offset: u64, buf: &mut [u8]) {
        let pages = self.pages.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let p = at / Self::PAGE;
            let in_page = (at % Self::PAGE) as usize;
            let n = (Self::PAGE as usize - in_page).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match pages.get(&p) {
                Some(page) => dst.copy_from_slice(&page[in_page..in_page + n]),
                None => dst.copy_from_slice(&self.base[at as usize..at as usize + n]),
            }
            done += n;
        }
    }
}

impl Media for OverlayDevice {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }
    fn persistence(&self) -> PersistenceMode {
        PersistenceMode::Recorded
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.get(offset, buf);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        check_range(offset, data.len() as u64, self.size())?;
        self.put(offset, data);
        Ok(())
    }
    fn write_nt(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.write(offset, data)
    }
    fn zero_nt(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.write(offset, &vec![0; usize::try_from(len).unwrap_or(0)])
    }
    fn flush(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.size())
    }
    fn fence(&self) {}
    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError> {
        check_word(offset, self.size())?;
        let mut w = [0u8; 8];
        self.get(offset, &mut w);
        Ok(u64::from_le_bytes(w))
    }
    fn store_u64(&self, offset: u64, value: u64) -> Result<(), DeviceError> {
        check_word(offset, self.size())?;
        self.put(offset, &value.to_le_bytes());
        Ok(())
    }
    fn fetch_or_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        let old = self.load_u64(offset)?;
        self.store_u64(offset, old | mask)?;
        Ok(old)
    }
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        let old = self.load_u64(offset)?;
        self.store_u64(offset, old & mask)?;
        Ok(old)
    }
    fn sync_all(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reserve(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn can_discard(&self) -> bool {
        false
    }
    fn discard(&self, _: u64, _: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::NoDiscard)
    }
}

impl Media for RecordingDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn persistence(&self) -> PersistenceMode {
        PersistenceMode::Recorded
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let g = self.inner.lock();
        let o = offset as usize;
        buf.copy_from_slice(&g.image[o..o + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.store(offset, data, false)
    }

    fn write_nt(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.store(offset, data, true)
    }

    fn zero_nt(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.size)?;
        self.store(offset, &vec![0; len as usize], true)
    }

    fn flush(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.size)?;
        let mut g = self.inner.lock();
        match g.flushes_left {
            Some(0) => {
                return Err(DeviceError::Io {
                    path: "recording device".into(),
                    source: std::io::Error::other("injected flush failure (failpoint)"),
                });
            }
            Some(n) => g.flushes_left = Some(n - 1),
            None => {}
        }
        self.record(&mut g, Event::Flush { offset, len });
        Ok(())
    }

    fn fence(&self) {
        let mut g = self.inner.lock();
        self.record(&mut g, Event::Fence);
    }

    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError> {
        check_word(offset, self.size)?;
        let mut w = [0u8; 8];
        self.read(offset, &mut w)?;
        Ok(u64::from_le_bytes(w))
    }

    fn store_u64(&self, offset: u64, value: u64) -> Result<(), DeviceError> {
        check_word(offset, self.size)?;
        self.store(offset, &value.to_le_bytes(), false)
    }

    fn fetch_or_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.rmw(offset, |v| v | mask)
    }

    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.rmw(offset, |v| v & mask)
    }

    fn sync_all(&self) -> Result<(), DeviceError> {
        let mut g = self.inner.lock();
        // Everything becomes durable: model it as flushing the whole device and fencing.
        let size = self.size;
        self.record(
            &mut g,
            Event::Flush {
                offset: 0,
                len: size,
            },
        );
        self.record(&mut g, Event::Fence);
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.size)?;
        let mut g = self.inner.lock();
        let fails = g.reserve_fails;
        let Some(reserved) = g.reserved.as_mut() else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let chunks = chunks_touching(offset, len);
        let missing = chunks
            .clone()
            .any(|c| !reserved.get(c as usize).copied().unwrap_or(true));
        if missing && fails {
            return Err(DeviceError::NoSpace("recording device".into()));
        }
        for c in chunks {
            if let Some(r) = reserved.get_mut(c as usize) {
                *r = true;
            }
        }
        Ok(())
    }

    fn can_discard(&self) -> bool {
        self.inner.lock().reserved.is_some()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<u64, DeviceError> {
        check_range(offset, len, self.size)?;
        let mut g = self.inner.lock();
        let Inner {
            reserved, image, ..
        } = &mut *g;
        let Some(reserved) = reserved.as_mut() else {
            return Err(DeviceError::NoDiscard);
        };
        let mut discarded = 0;
        for c in chunks_inside(offset, len, self.size) {
            if let Some(r) = reserved.get_mut(c as usize) {
                *r = false;
            }
            // A hole reads as zeros. (Not a logged store: punching is no cache-line store,
            // and the crash model has nothing to say about it.)
            let start = (c * RESERVE_CHUNK) as usize;
            let end = ((c + 1) * RESERVE_CHUNK).min(self.size) as usize;
            image[start..end].fill(0);
            discarded += (end - start) as u64;
        }
        Ok(discarded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_store_is_optional_flushed_store_is_durable() {
        let d = RecordingDevice::new(4096);
        d.start_recording();
        d.write(0, &[1; 8]).unwrap();
        d.flush(0, 8).unwrap();
        d.fence();
        d.write(128, &[2; 8]).unwrap();
        d.fence();
        assert_eq!(d.fence_count(), 2);
        // Before fence 0: the first store is pending.
        let c0 = d.crash_images(0);
        assert_eq!(c0.pending.len(), 1);
        assert_eq!(c0.durable[0], 0);
        // Before fence 1: the first store is durable; the second (never flushed) pending.
        let c1 = d.crash_images(1);
        assert_eq!(c1.durable[0], 1);
        assert_eq!(c1.pending.len(), 1);
        assert_eq!(c1.pending[0].0, 128);
        let all = c1.enumerate(8, 0, 1);
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|i| i[128] == 2) && all.iter().any(|i| i[128] == 0));
        // After everything: the never-flushed store is still only pending.
        let c2 = d.crash_images(2);
        assert_eq!(c2.pending.len(), 1);
    }

    #[test]
    fn out_of_bounds_is_an_error() {
        let d = RecordingDevice::new(64);
        assert!(d.write(60, &[0; 8]).is_err());
        assert!(d.load_u64(4).is_err());
        assert!(d.read(u64::MAX, &mut [0; 2]).is_err());
    }
}
