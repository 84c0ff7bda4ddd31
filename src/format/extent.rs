//! Extent records: the one validity rule of an [`ExtentRecord`] (docs/FORMAT.md,
//! "ExtentRecord") and the codec of the inline extents of an inode, shared by the core
//! (`fs::extent`), the checker and the repair.

use super::{
    ExtentRecord, Geometry, INLINE_EXTENTS, INODE_INLINE_LEN, Inode, MAX_FILE_BLOCKS, extent_flags,
};
use zerocopy::{FromBytes, IntoBytes};

const REC: usize = size_of::<ExtentRecord>();

/// Why an extent record is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtentDamage {
    #[error("an extent record of the wrong size")]
    Size,
    #[error("an invalid extent")]
    Invalid,
    #[error("an extent under the wrong key")]
    WrongKey,
    #[error("an extent beyond the largest file size")]
    BeyondMaxSize,
    #[error("an extent outside the data area")]
    OutsideData,
}

impl ExtentRecord {
    /// The file block after the extent (the record must be valid: no overflow).
    pub fn file_end(&self) -> u64 {
        self.file_block + u64::from(self.len)
    }

    /// Checks one record on its own: `len` > 0, known flags, the file range below
    /// [`MAX_FILE_BLOCKS`], the device range inside the data area. Whether the extents of one
    /// file overlap is the map's rule, not the record's.
    pub fn validate(&self, g: &Geometry) -> Result<(), ExtentDamage> {
        let len = u64::from(self.len);
        if self.len == 0 || self.flags & !extent_flags::ALL != 0 {
            Err(ExtentDamage::Invalid)
        } else if self
            .file_block
            .checked_add(len)
            .is_none_or(|e| e > MAX_FILE_BLOCKS)
        {
            Err(ExtentDamage::BeyondMaxSize)
        } else if !g.is_data_range(self.dev_block, len) {
            Err(ExtentDamage::OutsideData)
        } else {
            Ok(())
        }
    }

    /// Decodes and validates the payload of an extent-tree leaf record with key `key`.
    pub fn from_leaf(key: u64, payload: &[u8], g: &Geometry) -> Result<Self, ExtentDamage> {
        let rec = Self::read_from_bytes(payload).map_err(|_| ExtentDamage::Size)?;
        rec.validate_keyed(key, g)?;
        Ok(rec)
    }

    /// [`validate`](Self::validate) for a record stored under `key` (the key must be the
    /// record's `file_block`; a record that is invalid in itself is reported as such first).
    pub fn validate_keyed(&self, key: u64, g: &Geometry) -> Result<(), ExtentDamage> {
        match self.validate(g) {
            Err(ExtentDamage::Invalid) => Err(ExtentDamage::Invalid),
            _ if key != self.file_block => Err(ExtentDamage::WrongKey),
            r => r,
        }
    }
}

impl Inode {
    /// The inline extent records, unvalidated: the first `inline_count` of them, at most
    /// [`INLINE_EXTENTS`] (a larger count is the caller's to refuse).
    pub fn inline_extents(&self) -> impl Iterator<Item = ExtentRecord> + '_ {
        self.inline
            .chunks_exact(REC)
            .take((self.inline_count as usize).min(INLINE_EXTENTS))
            .filter_map(|b| ExtentRecord::read_from_bytes(b).ok())
    }

    /// Stores `recs` (at most [`INLINE_EXTENTS`]) as the inline extents; the rest of the
    /// inline area is zeroed.
    pub fn set_inline_extents(&mut self, recs: &[ExtentRecord]) {
        debug_assert!(recs.len() <= INLINE_EXTENTS);
        self.inline = [0; INODE_INLINE_LEN];
        for (slot, r) in self.inline.chunks_exact_mut(REC).zip(recs) {
            slot.copy_from_slice(r.as_bytes());
        }
        self.inline_count = recs.len() as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity() {
        let g = Geometry::for_device_size(64 << 20).unwrap();
        let ok = ExtentRecord {
            file_block: 7,
            dev_block: g.meta_end,
            len: 3,
            flags: extent_flags::UNWRITTEN,
        };
        assert_eq!(ok.validate(&g), Ok(()));
        assert_eq!(ok.validate_keyed(7, &g), Ok(()));
        assert_eq!(ok.validate_keyed(8, &g), Err(ExtentDamage::WrongKey));
        let bad = |f: fn(&mut ExtentRecord)| {
            let mut r = ok;
            f(&mut r);
            r.validate(&g)
        };
        assert_eq!(bad(|r| r.len = 0), Err(ExtentDamage::Invalid));
        assert_eq!(bad(|r| r.flags = 2), Err(ExtentDamage::Invalid));
        assert_eq!(
            bad(|r| r.file_block = u64::MAX),
            Err(ExtentDamage::BeyondMaxSize)
        );
        assert_eq!(bad(|r| r.dev_block = 1), Err(ExtentDamage::OutsideData));
        assert_eq!(
            bad(|r| r.dev_block = u64::MAX - 1),
            Err(ExtentDamage::OutsideData)
        );
        assert_eq!(
            ExtentRecord::from_leaf(7, &ok.as_bytes()[..20], &g),
            Err(ExtentDamage::Size)
        );
        assert_eq!(ExtentRecord::from_leaf(7, ok.as_bytes(), &g), Ok(ok));
    }

    #[test]
    fn inline_round_trip() {
        let mut i = Inode::empty();
        let recs: Vec<ExtentRecord> = (0..3)
            .map(|k| ExtentRecord {
                file_block: k * 10,
                dev_block: 1000 + k,
                len: 1,
                flags: 0,
            })
            .collect();
        i.set_inline_extents(&recs);
        assert_eq!(i.inline_count, 3);
        assert_eq!(i.inline_extents().collect::<Vec<_>>(), recs);
        i.inline_count = 99;
        assert_eq!(i.inline_extents().count(), INLINE_EXTENTS);
    }
}
