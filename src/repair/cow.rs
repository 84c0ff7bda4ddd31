//! A copy-on-write view of a device: reads fall through to the device, stores stay in memory.
//!
//! `fsck -n` diagnoses through it: the low-level repairs that must precede a full check (a
//! primary superblock restored from its backup, an interrupted transaction rolled back) are
//! applied to the view only, so the check sees the file system as a repair would, and the
//! device is never written.

use crate::device::{DeviceError, Media, PersistenceMode};
use crate::format::BLOCK_SIZE;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

const PAGE: u64 = BLOCK_SIZE;

/// A copy-on-write overlay over another [`Media`].
#[derive(Debug)]
pub struct CowMedia {
    base: Arc<dyn Media>,
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
}

impl CowMedia {
    pub fn new(base: Arc<dyn Media>) -> Self {
        Self {
            base,
            pages: Mutex::new(HashMap::new()),
        }
    }

    /// Pages changed in the overlay.
    pub fn changed_pages(&self) -> usize {
        self.pages.lock().len()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.base.size() => Ok(()),
            _ => Err(DeviceError::OutOfBounds {
                offset,
                len,
                size: self.base.size(),
            }),
        }
    }

    /// Runs `f` on the overlay copy of page `page`, loading it first.
    fn with_page<R>(
        &self,
        pages: &mut HashMap<u64, Box<[u8]>>,
        page: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DeviceError> {
        if let std::collections::hash_map::Entry::Vacant(v) = pages.entry(page) {
            let start = page * PAGE;
            let len = PAGE.min(self.base.size() - start);
            let mut buf = vec![0u8; len as usize];
            self.base.read(start, &mut buf)?;
            v.insert(buf.into_boxed_slice());
        }
        let p = pages.get_mut(&page).ok_or(DeviceError::ReadOnly)?;
        Ok(f(p))
    }

    fn rmw(&self, offset: u64, f: impl FnOnce(u64) -> u64) -> Result<u64, DeviceError> {
        if offset % 8 != 0 {
            return Err(DeviceError::Misaligned(offset));
        }
        self.check(offset, 8)?;
        let mut pages = self.pages.lock();
        let at = (offset % PAGE) as usize;
        self.with_page(&mut pages, offset / PAGE, |p| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&p[at..at + 8]);
            let old = u64::from_le_bytes(w);
            p[at..at + 8].copy_from_slice(&f(old).to_le_bytes());
            old
        })
    }
}

impl Media for CowMedia {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn persistence(&self) -> PersistenceMode {
        self.base.persistence()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check(offset, buf.len() as u64)?;
        let pages = self.pages.lock();
        if pages.is_empty() {
            drop(pages);
            return self.base.read(offset, buf);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match pages.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => self.base.read(pos, &mut buf[done..done + n])?,
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.check(offset, data.len() as u64)?;
        let mut pages = self.pages.lock();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            self.with_page(&mut pages, pos / PAGE, |p| {
                p[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            })?;
            done += n;
        }
        Ok(())
    }

    fn write_nt(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.write(offset, data)
    }

    fn zero_nt(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check(offset, len)?;
        let zeros = vec![0u8; PAGE as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (PAGE - pos % PAGE).min(end - pos);
            self.write(pos, &zeros[..n as usize])?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check(offset, len)
    }

    fn fence(&self) {}

    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError> {
        if offset % 8 != 0 {
            return Err(DeviceError::Misaligned(offset));
        }
        let mut w = [0u8; 8];
        self.read(offset, &mut w)?;
        Ok(u64::from_le_bytes(w))
    }

    fn store_u64(&self, offset: u64, value: u64) -> Result<(), DeviceError> {
        self.rmw(offset, |_| value).map(drop)
    }

    fn fetch_or_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.rmw(offset, |w| w | mask)
    }

    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.rmw(offset, |w| w & mask)
    }

    fn sync_all(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Stores stay in memory: nothing of the base needs backing.
    fn reserve(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check(offset, len)
    }

    fn can_discard(&self) -> bool {
        false
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::NoDiscard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RecordingDevice;

    #[test]
    fn overlay_reads_its_own_stores_and_leaves_the_base_alone() {
        let base: Arc<dyn Media> = Arc::new(RecordingDevice::new(3 * PAGE + 100));
        base.write(10, b"base").unwrap();
        let cow = CowMedia::new(Arc::clone(&base));
        cow.write(PAGE - 2, b"span").unwrap();
        cow.store_u64(3 * PAGE, 7).unwrap();
        assert_eq!(cow.fetch_or_u64(3 * PAGE, 8).unwrap(), 7);
        let mut b = [0u8; 4];
        cow.read(PAGE - 2, &mut b).unwrap();
        assert_eq!(&b, b"span");
        cow.read(10, &mut b).unwrap();
        assert_eq!(&b, b"base");
        base.read(PAGE - 2, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        assert_eq!(cow.load_u64(3 * PAGE).unwrap(), 15);
        assert!(cow.write(3 * PAGE + 98, b"xyz").is_err());
        cow.write(3 * PAGE + 97, b"xyz").unwrap();
    }
}
