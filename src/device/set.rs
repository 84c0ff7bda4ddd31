//! Several devices as one [`Media`]: the members of a multi-device file system laid out in one
//! logical address space.
//!
//! Member 0 sits at logical offset 0; every other member at a 1 GiB-aligned logical base after
//! the end of the one before (the bases come from the device table, `format::DeviceTable`).
//! Between the end of one member and the base of the next lies a *gap*: logical addresses
//! that belong to no device. [`DeviceSet`] routes each call to the member that owns its range;
//! a range that touches a gap or crosses from one member into the next is
//! [`DeviceError::OutOfBounds`], as any access past the end of a single device is. Nothing
//! above ever makes such an access: the gaps are allocated in the block bitmap from mkfs on
//! (so no extent, node or inode-table chunk can lie in one), and an extent is one run of
//! blocks inside the data area, which never spans a gap.
//!
//! The exceptions are the calls about backing store, [`Media::reserve`] and
//! [`Media::discard`], and [`Media::flush`]: the mount reserves runs of chunks in use, which
//! may run over a gap (gaps are "in use"); these are split by member and the gap parts are
//! ignored (there is nothing to back or hand back there).
//!
//! Ordering: a fence is a fence of every member. On CPU-flushed media that is one `sfence`
//! per member, of which the first already orders every earlier flush and non-temporal store
//! of the CPU, whichever mapping the lines belong to (the persistence ladder of
//! docs/ARCHITECTURE.md holds across members); members in msync mode have nothing in flight
//! after their flushes.
//!
//! [`Window`] shows a range of another media as a device of its own: the crash tests build
//! members as windows onto one [`super::RecordingDevice`], so that every crash image they
//! enumerate is one consistent state of all members together.

use super::{DeviceError, Media, PersistenceMode, check_range};
use std::fmt;
use std::sync::Arc;

/// One member of a [`DeviceSet`]: `len` bytes of `media` (from its offset 0) at logical
/// offset `base`.
#[derive(Clone, Debug)]
pub struct SetMember {
    pub media: Arc<dyn Media>,
    pub base: u64,
    pub len: u64,
}

/// Several media in one logical address space (see the module documentation).
pub struct DeviceSet {
    /// Sorted by base, non-overlapping, member 0 at base 0.
    members: Vec<SetMember>,
    size: u64,
}

impl fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_list();
        for m in &self.members {
            l.entry(&(m.base, m.len));
        }
        l.finish()
    }
}

impl DeviceSet {
    /// The set of `members`, which must be in order of their bases, member 0 at base 0, each
    /// member's range inside its media and after the previous member's end.
    pub fn new(members: Vec<SetMember>) -> Result<Self, DeviceError> {
        let mut end = 0u64;
        for (i, m) in members.iter().enumerate() {
            let bad = || DeviceError::Unsupported {
                path: format!("member {i}").into(),
                reason: format!(
                    "member at logical base {} of {} bytes does not fit the set (media of {} \
                     bytes, previous member ends at {end})",
                    m.base,
                    m.len,
                    m.media.size()
                ),
            };
            if (i == 0 && m.base != 0) || m.base < end || m.len == 0 || m.len > m.media.size() {
                return Err(bad());
            }
            end = m.base.checked_add(m.len).ok_or_else(bad)?;
        }
        if members.is_empty() {
            return Err(DeviceError::Unsupported {
                path: "device set".into(),
                reason: "no members".into(),
            });
        }
        Ok(Self { members, size: end })
    }

    pub fn members(&self) -> &[SetMember] {
        &self.members
    }

    /// The member whose range holds logical `offset`, if any (none in a gap).
    pub fn member_at(&self, offset: u64) -> Option<usize> {
        let i = self
            .members
            .partition_point(|m| m.base <= offset)
            .checked_sub(1)?;
        (offset - self.members[i].base < self.members[i].len).then_some(i)
    }

    /// The member and member offset of `offset..offset + len`, which must lie wholly inside
    /// one member (`len` may be 0 at a member's start or inside it).
    fn route(&self, offset: u64, len: u64) -> Result<(&SetMember, u64), DeviceError> {
        let oob = DeviceError::OutOfBounds {
            offset,
            len,
            size: self.size,
        };
        check_range(offset, len, self.size)?;
        let i = self.members.partition_point(|m| m.base <= offset);
        let m = &self.members[i.checked_sub(1).ok_or(oob)?];
        let inner = offset - m.base;
        match inner.checked_add(len) {
            Some(end) if end <= m.len && (inner < m.len || len == 0) => Ok((m, inner)),
            _ => Err(DeviceError::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// The parts of `offset..offset + len` (checked against the logical size) that lie on
    /// members, as (member, member offset, length); gaps are left out.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<impl Iterator<Item = (&SetMember, u64, u64)>, DeviceError> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        Ok(self.members.iter().filter_map(move |m| {
            let start = offset.max(m.base);
            let stop = end.min(m.base + m.len);
            (start < stop).then(|| (m, start - m.base, stop - start))
        }))
    }
}

impl Media for DeviceSet {
    fn size(&self) -> u64 {
        self.size
    }

    /// Msync when any member needs it (the caller then syncs), else member 0's mode.
    fn persistence(&self) -> PersistenceMode {
        let modes = self.members.iter().map(|m| m.media.persistence());
        if modes.clone().any(|p| p == PersistenceMode::Msync) {
            PersistenceMode::Msync
        } else {
            self.members[0].media.persistence()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let (m, at) = self.route(offset, buf.len() as u64)?;
        m.media.read(at, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let (m, at) = self.route(offset, data.len() as u64)?;
        m.media.write(at, data)
    }

    fn write_nt(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let (m, at) = self.route(offset, data.len() as u64)?;
        m.media.write_nt(at, data)
    }

    fn zero_nt(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let (m, at) = self.route(offset, len)?;
        m.media.zero_nt(at, len)
    }

    fn flush(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        for (m, at, n) in self.pieces(offset, len)? {
            m.media.flush(at, n)?;
        }
        Ok(())
    }

    fn fence(&self) {
        for m in &self.members {
            m.media.fence();
        }
    }

    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError> {
        let (m, at) = self.route(offset, 8)?;
        m.media.load_u64(at)
    }

    fn store_u64(&self, offset: u64, value: u64) -> Result<(), DeviceError> {
        let (m, at) = self.route(offset, 8)?;
        m.media.store_u64(at, value)
    }

    fn fetch_or_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        let (m, at) = self.route(offset, 8)?;
        m.media.fetch_or_u64(at, mask)
    }

    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        let (m, at) = self.route(offset, 8)?;
        m.media.fetch_and_u64(at, mask)
    }

    fn sync_all(&self) -> Result<(), DeviceError> {
        for m in &self.members {
            m.media.sync_all()?;
        }
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        for (m, at, n) in self.pieces(offset, len)? {
            m.media.reserve(at, n)?;
        }
        Ok(())
    }

    fn can_discard(&self) -> bool {
        self.members.iter().all(|m| m.media.can_discard())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<u64, DeviceError> {
        let mut total = 0;
        for (m, at, n) in self.pieces(offset, len)? {
            total += m.media.discard(at, n)?;
        }
        Ok(total)
    }
}

/// `len` bytes of `inner` from `start`, as a device of its own (offset 0 = `inner`'s
/// `start`). Fences and syncs are `inner`'s.
#[derive(Debug)]
pub struct Window {
    inner: Arc<dyn Media>,
    start: u64,
    len: u64,
}

impl Window {
    pub fn new(inner: Arc<dyn Media>, start: u64, len: u64) -> Result<Self, DeviceError> {
        check_range(start, len, inner.size())?;
        Ok(Self { inner, start, len })
    }

    fn at(&self, offset: u64, len: u64) -> Result<u64, DeviceError> {
        check_range(offset, len, self.len)?;
        Ok(self.start + offset)
    }
}

impl Media for Window {
    fn size(&self) -> u64 {
        self.len
    }

    fn persistence(&self) -> PersistenceMode {
        self.inner.persistence()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(self.at(offset, buf.len() as u64)?, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.inner.write(self.at(offset, data.len() as u64)?, data)
    }

    fn write_nt(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.inner
            .write_nt(self.at(offset, data.len() as u64)?, data)
    }

    fn zero_nt(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.zero_nt(self.at(offset, len)?, len)
    }

    fn flush(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.flush(self.at(offset, len)?, len)
    }

    fn fence(&self) {
        self.inner.fence();
    }

    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError> {
        self.inner.load_u64(self.at(offset, 8)?)
    }

    fn store_u64(&self, offset: u64, value: u64) -> Result<(), DeviceError> {
        self.inner.store_u64(self.at(offset, 8)?, value)
    }

    fn fetch_or_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.inner.fetch_or_u64(self.at(offset, 8)?, mask)
    }

    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, DeviceError> {
        self.inner.fetch_and_u64(self.at(offset, 8)?, mask)
    }

    fn sync_all(&self) -> Result<(), DeviceError> {
        self.inner.sync_all()
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.reserve(self.at(offset, len)?, len)
    }

    fn can_discard(&self) -> bool {
        self.inner.can_discard()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<u64, DeviceError> {
        self.inner.discard(self.at(offset, len)?, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RecordingDevice;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Two members as windows onto one recording device: member 0 = bytes 0..16 MiB at
    /// logical 0, member 1 = bytes 16..24 MiB at logical 1 GiB.
    fn two() -> (Arc<RecordingDevice>, DeviceSet) {
        let rec = Arc::new(RecordingDevice::new(24 * MIB));
        let inner: Arc<dyn Media> = rec.clone();
        let w0: Arc<dyn Media> = Arc::new(Window::new(inner.clone(), 0, 16 * MIB).unwrap());
        let w1: Arc<dyn Media> = Arc::new(Window::new(inner, 16 * MIB, 8 * MIB).unwrap());
        let set = DeviceSet::new(vec![
            SetMember {
                media: w0,
                base: 0,
                len: 16 * MIB,
            },
            SetMember {
                media: w1,
                base: GIB,
                len: 8 * MIB,
            },
        ])
        .unwrap();
        (rec, set)
    }

    #[test]
    fn calls_go_to_the_member_that_owns_the_range() {
        let (rec, set) = two();
        assert_eq!(set.size(), GIB + 8 * MIB);
        set.write(100, b"zero").unwrap();
        set.write(GIB + 4096, b"one").unwrap();
        set.store_u64(GIB + 8 * MIB - 8, 0xfeed).unwrap();
        let raw = rec.snapshot();
        assert_eq!(&raw[100..104], b"zero");
        let at1 = (16 * MIB + 4096) as usize;
        assert_eq!(&raw[at1..at1 + 3], b"one");
        assert_eq!(set.load_u64(GIB + 8 * MIB - 8).unwrap(), 0xfeed);
        assert_eq!(rec.load_u64(24 * MIB - 8).unwrap(), 0xfeed);
        assert_eq!(set.fetch_or_u64(GIB, 3).unwrap(), 0);
        assert_eq!(rec.load_u64(16 * MIB).unwrap(), 3);
        let mut buf = [0u8; 3];
        set.read(GIB + 4096, &mut buf).unwrap();
        assert_eq!(&buf, b"one");
        assert_eq!(set.member_at(0), Some(0));
        assert_eq!(set.member_at(16 * MIB), None);
        assert_eq!(set.member_at(GIB), Some(1));
        assert_eq!(set.member_at(GIB + 8 * MIB), None);
    }

    #[test]
    fn gaps_and_crossings_are_out_of_bounds() {
        let (_rec, set) = two();
        let mut buf = [0u8; 16];
        // Inside the gap, straddling member 0's end, straddling member 1's start, past the end.
        for at in [
            16 * MIB,
            16 * MIB - 8,
            GIB - 8,
            GIB + 8 * MIB - 8,
            u64::MAX - 4,
        ] {
            assert!(
                matches!(set.read(at, &mut buf), Err(DeviceError::OutOfBounds { .. })),
                "read at {at}"
            );
            assert!(matches!(
                set.write(at, &buf),
                Err(DeviceError::OutOfBounds { .. })
            ));
        }
        assert!(matches!(
            set.load_u64(GIB - 8),
            Err(DeviceError::OutOfBounds { .. })
        ));
        // Backing-store calls skip the gap instead.
        set.reserve(0, GIB + 8 * MIB).unwrap();
        set.flush(16 * MIB - 64, GIB - 16 * MIB + 4096).unwrap();
    }

    #[test]
    fn bad_layouts_are_refused() {
        let d = |n| -> Arc<dyn Media> { Arc::new(RecordingDevice::new(n)) };
        let m = |media: Arc<dyn Media>, base, len| SetMember { media, base, len };
        assert!(DeviceSet::new(vec![]).is_err());
        assert!(DeviceSet::new(vec![m(d(MIB), 4096, MIB)]).is_err());
        assert!(DeviceSet::new(vec![m(d(MIB), 0, 2 * MIB)]).is_err());
        assert!(DeviceSet::new(vec![m(d(MIB), 0, MIB), m(d(MIB), MIB - 1, MIB)]).is_err());
        assert!(DeviceSet::new(vec![m(d(MIB), 0, MIB), m(d(MIB), u64::MAX, MIB)]).is_err());
        assert!(DeviceSet::new(vec![m(d(MIB), 0, MIB), m(d(MIB), MIB, MIB)]).is_ok());
    }

    #[test]
    fn fences_reach_every_member() {
        let (rec, set) = two();
        rec.start_recording();
        set.write(GIB, b"x").unwrap();
        set.flush(GIB, 1).unwrap();
        set.fence();
        // Both windows fence the one device.
        assert_eq!(rec.fence_count(), 2);
    }
}
