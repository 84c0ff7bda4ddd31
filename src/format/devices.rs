//! Multi-device file systems ([`IncompatFeatures::MULTI_DEVICE`]): the device table in block 0
//! of member 0 and the member header at the start of every other member.
//!
//! The file system sees one logical address space (`device::DeviceSet`): member 0 at logical
//! byte 0, holding all the fixed metadata as a single device does; member *k* at the first
//! 1 GiB boundary at or after the end of member *k* − 1. The bases are therefore a function
//! of the sizes, and the table is refused unless they are exactly that, so no table can make
//! members overlap. Every member's size is a multiple of 2 MiB, so every 2 MiB and 1 GiB
//! boundary of a member is one of the logical space: huge-page alignment holds on every
//! member. The *reserved ranges* (the logical gap before each member *k* ≥ 1 and the block of
//! its member header) are allocated in the block bitmap from mkfs on and are never freed:
//! fsck and its repair know them from the table ([`DeviceTable::reserved_blocks`]).

use super::{
    BLOCK_SIZE, CHUNK_SIZE, FormatError, IncompatFeatures, MIN_DEVICE_SIZE, REGION_SIZE,
    Superblock, checksum, verify_checksum,
};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Byte offset of the device table in block 0 of member 0 (after the state record, in bytes
/// a single-device file system leaves zero).
pub const DEVICE_TABLE_OFFSET: u64 = 3072;
/// Device-table magic.
pub const DEVICE_TABLE_MAGIC: u64 = u64::from_le_bytes(*b"PMFSDEVT");
/// Member-header magic.
pub const MEMBER_MAGIC: u64 = u64::from_le_bytes(*b"PMFSMEMB");
/// Most members a file system has.
pub const MAX_MEMBERS: usize = 16;
/// Smallest member after member 0: its header block and at least one whole free chunk.
pub const MIN_MEMBER_SIZE: u64 = 2 * CHUNK_SIZE;
/// A member's `node` when nobody said which NUMA node it is on.
pub const NODE_UNKNOWN: u32 = u32::MAX;

/// One member in the device table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DeviceEntry {
    /// Logical byte offset of the member's first byte.
    pub base: u64,
    /// Bytes of the member the file system uses (a multiple of 2 MiB).
    pub size: u64,
    /// NUMA node recorded at mkfs, or [`NODE_UNKNOWN`].
    pub node: u32,
    pub pad: u32,
    pub reserved: u64,
}

/// The device table: at [`DEVICE_TABLE_OFFSET`] of member 0, written at mkfs only.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DeviceTable {
    pub magic: u64,
    /// Members, 2..=[`MAX_MEMBERS`].
    pub count: u32,
    pub pad: u32,
    /// `entries[..count]` are the members in order; the rest are zero.
    pub entries: [DeviceEntry; MAX_MEMBERS],
    pub reserved: [u8; 44],
    /// CRC32C of the bytes before this field.
    pub crc: u32,
}

const _: () = assert!(size_of::<DeviceTable>() == 576);
const _: () = assert!(DEVICE_TABLE_OFFSET + size_of::<DeviceTable>() as u64 <= BLOCK_SIZE);

/// The header at byte 0 of every member but member 0 (its block 0 holds nothing else).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MemberHeader {
    pub magic: u64,
    /// The file system's UUID (the superblock's).
    pub uuid: [u8; 16],
    /// This member's index in the device table (1..count).
    pub index: u32,
    /// Members of the file system.
    pub count: u32,
    /// As the table's entry for this member.
    pub base: u64,
    pub size: u64,
    pub node: u32,
    pub pad: u32,
    pub reserved: [u8; 196],
    /// CRC32C of the bytes before this field.
    pub crc: u32,
}

const _: () = assert!(size_of::<MemberHeader>() == 256);

fn corrupted(detail: String) -> FormatError {
    FormatError::corrupted("device table", detail)
}

/// The logical base of a member that follows one ending at logical byte `end`.
pub fn next_base(end: u64) -> Option<u64> {
    end.checked_next_multiple_of(REGION_SIZE)
}

impl DeviceTable {
    const CRC_OFFSET: usize = std::mem::offset_of!(DeviceTable, crc);

    /// The table of members of `sizes` bytes (each rounded down to 2 MiB) and `nodes`,
    /// laid out as the format requires, sealed; validated as [`DeviceTable::decode`] does.
    pub fn build(sizes: &[u64], nodes: &[u32]) -> Result<Self, FormatError> {
        let mut t = Self::new_zeroed();
        t.magic = DEVICE_TABLE_MAGIC;
        t.count = u32::try_from(sizes.len()).unwrap_or(u32::MAX);
        if !(2..=MAX_MEMBERS).contains(&sizes.len()) || nodes.len() != sizes.len() {
            return Err(corrupted(format!(
                "{} devices: a multi-device file system has 2 to {MAX_MEMBERS}",
                sizes.len()
            )));
        }
        let mut end = 0u64;
        for (i, (&size, &node)) in sizes.iter().zip(nodes).enumerate() {
            let base = if i == 0 {
                0
            } else {
                next_base(end).unwrap_or(u64::MAX)
            };
            t.entries[i] = DeviceEntry {
                base,
                size: size / CHUNK_SIZE * CHUNK_SIZE,
                node,
                pad: 0,
                reserved: 0,
            };
            end = base.saturating_add(t.entries[i].size);
        }
        t.seal();
        t.validate()?;
        Ok(t)
    }

    pub fn seal(&mut self) {
        self.crc = checksum(&self.as_bytes()[..Self::CRC_OFFSET]);
    }

    /// Decodes and validates the table (magic, checksum, member count, the layout of the
    /// bases and sizes), in time bounded by [`MAX_MEMBERS`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (t, _) = Self::read_from_prefix(bytes).map_err(|_| corrupted("short read".into()))?;
        if t.magic != DEVICE_TABLE_MAGIC {
            return Err(corrupted("bad magic".into()));
        }
        verify_checksum("device table", &bytes[..Self::CRC_OFFSET], t.crc)?;
        t.validate()?;
        Ok(t)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let count = self.count as usize;
        if !(2..=MAX_MEMBERS).contains(&count) {
            return Err(corrupted(format!(
                "{count} members (a multi-device file system has 2 to {MAX_MEMBERS})"
            )));
        }
        let mut end = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            if i >= count {
                if *e != DeviceEntry::new_zeroed() {
                    return Err(corrupted(format!("entry {i} past the {count} members")));
                }
                continue;
            }
            let expected_base = if i == 0 { Some(0) } else { next_base(end) };
            let min = if i == 0 {
                MIN_DEVICE_SIZE
            } else {
                MIN_MEMBER_SIZE
            };
            if Some(e.base) != expected_base {
                return Err(corrupted(format!(
                    "member {i} at logical base {} (must be {})",
                    e.base,
                    expected_base.map_or("past 2^64".into(), |b| b.to_string())
                )));
            }
            if e.size % CHUNK_SIZE != 0 || e.size < min {
                return Err(corrupted(format!(
                    "member {i} of {} bytes (a multiple of 2 MiB, at least {min})",
                    e.size
                )));
            }
            end = e
                .base
                .checked_add(e.size)
                .filter(|&end| end <= BLOCK_SIZE << 40)
                .ok_or_else(|| corrupted(format!("member {i} ends past the largest device")))?;
        }
        Ok(())
    }

    /// The members, in order.
    pub fn members(&self) -> &[DeviceEntry] {
        &self.entries[..(self.count as usize).min(MAX_MEMBERS)]
    }

    /// Logical end of the last member: the file system's size in bytes.
    pub fn end(&self) -> u64 {
        self.members().last().map_or(0, |e| e.base + e.size)
    }

    /// Checks the table against the superblock that names it: the file system covers
    /// exactly the members.
    pub fn check_superblock(&self, sb: &Superblock) -> Result<(), FormatError> {
        if sb.block_count.checked_mul(BLOCK_SIZE) != Some(self.end()) {
            return Err(corrupted(format!(
                "members end at logical byte {}, the superblock covers {} blocks",
                self.end(),
                sb.block_count
            )));
        }
        Ok(())
    }

    /// Block ranges `(first, count)` that are allocated for the layout itself: for each member
    /// *k* ≥ 1, the logical gap before it and its member-header block, as one range.
    pub fn reserved_blocks(&self) -> Vec<(u64, u64)> {
        self.members()
            .windows(2)
            .map(|w| {
                let first = (w[0].base + w[0].size) / BLOCK_SIZE;
                (first, w[1].base / BLOCK_SIZE + 1 - first)
            })
            .collect()
    }

    /// The header of member `index` (≥ 1), sealed.
    pub fn member_header(&self, uuid: [u8; 16], index: usize) -> MemberHeader {
        let e = self.entries[index];
        let mut h = MemberHeader::new_zeroed();
        h.magic = MEMBER_MAGIC;
        h.uuid = uuid;
        h.index = index as u32;
        h.count = self.count;
        h.base = e.base;
        h.size = e.size;
        h.node = e.node;
        h.seal();
        h
    }
}

impl MemberHeader {
    const CRC_OFFSET: usize = std::mem::offset_of!(MemberHeader, crc);

    pub fn seal(&mut self) {
        self.crc = checksum(&self.as_bytes()[..Self::CRC_OFFSET]);
    }

    /// Decodes a member header: magic and checksum (what it says is checked against the
    /// table by [`MemberHeader::check`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (h, _) = Self::read_from_prefix(bytes)
            .map_err(|_| FormatError::corrupted("member header", "short read"))?;
        if h.magic != MEMBER_MAGIC {
            return Err(FormatError::BadMagic);
        }
        verify_checksum("member header", &bytes[..Self::CRC_OFFSET], h.crc)?;
        Ok(h)
    }

    /// Whether this header is the one `table` (of the file system `uuid`) expects of member
    /// `index`; the mismatch in words otherwise.
    pub fn check(&self, table: &DeviceTable, uuid: [u8; 16], index: usize) -> Result<(), String> {
        if self.uuid != uuid {
            return Err(format!(
                "belongs to another file system (uuid {})",
                super::format_uuid(&self.uuid)
            ));
        }
        if self.count != table.count || self.index as usize != index {
            return Err(format!(
                "is member {} of {}, expected member {index} of {}",
                self.index, self.count, table.count
            ));
        }
        let e = table.entries[index];
        if (self.base, self.size) != (e.base, e.size) {
            return Err(format!(
                "says {} bytes at logical {}, the device table {} bytes at {}",
                self.size, self.base, e.size, e.base
            ));
        }
        Ok(())
    }
}

/// Whether a superblock has the multi-device feature.
pub fn is_multi_device(sb: &Superblock) -> bool {
    sb.incompat & IncompatFeatures::MULTI_DEVICE.bits() != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn layout_follows_the_sizes() {
        let t =
            DeviceTable::build(&[100 * MIB + 4096, 3 * GIB + MIB, 64 * MIB], &[0, 1, 7]).unwrap();
        let m = t.members();
        assert_eq!((m[0].base, m[0].size), (0, 100 * MIB));
        assert_eq!((m[1].base, m[1].size), (GIB, 3 * GIB));
        assert_eq!((m[2].base, m[2].size), (4 * GIB, 64 * MIB));
        assert_eq!(t.end(), 4 * GIB + 64 * MIB);
        let b = |x: u64| x / BLOCK_SIZE;
        assert_eq!(
            t.reserved_blocks(),
            vec![(b(100 * MIB), b(GIB - 100 * MIB) + 1), (b(4 * GIB), 1)]
        );
        let again = DeviceTable::decode(t.as_bytes()).unwrap();
        assert_eq!(again.members(), t.members());
    }

    #[test]
    fn hostile_tables_are_refused() {
        let good = DeviceTable::build(&[64 * MIB, 64 * MIB], &[0, 1]).unwrap();
        let mutate = |f: &dyn Fn(&mut DeviceTable)| {
            let mut t = good;
            f(&mut t);
            t.seal();
            DeviceTable::decode(t.as_bytes())
        };
        assert!(mutate(&|_| {}).is_ok());
        assert!(mutate(&|t| t.count = 0).is_err());
        assert!(mutate(&|t| t.count = 1).is_err());
        assert!(mutate(&|t| t.count = u32::MAX).is_err());
        assert!(
            mutate(&|t| t.entries[1].base = 32 * MIB).is_err(),
            "overlap"
        );
        assert!(
            mutate(&|t| t.entries[1].base = 2 * GIB).is_err(),
            "not canonical"
        );
        assert!(mutate(&|t| t.entries[0].base = GIB).is_err());
        assert!(mutate(&|t| t.entries[1].size = MIB).is_err());
        assert!(mutate(&|t| t.entries[1].size = u64::MAX - CHUNK_SIZE + 1).is_err());
        assert!(mutate(&|t| t.entries[5].node = 1).is_err(), "stray entry");
        let mut torn = good;
        torn.entries[1].size += CHUNK_SIZE;
        assert!(matches!(
            DeviceTable::decode(torn.as_bytes()),
            Err(FormatError::Checksum { .. })
        ));
        assert!(DeviceTable::build(&[64 * MIB], &[0]).is_err());
        assert!(DeviceTable::build(&[64 * MIB; 17], &[0; 17]).is_err());
    }

    #[test]
    fn member_headers_name_their_place() {
        let t = DeviceTable::build(&[64 * MIB, 64 * MIB, 64 * MIB], &[0, 1, 1]).unwrap();
        let h = MemberHeader::decode(t.member_header([1; 16], 2).as_bytes()).unwrap();
        assert!(h.check(&t, [1; 16], 2).is_ok());
        assert!(
            h.check(&t, [2; 16], 2)
                .unwrap_err()
                .contains("another file system")
        );
        assert!(
            h.check(&t, [1; 16], 1)
                .unwrap_err()
                .contains("is member 2 of 3")
        );
        let other = DeviceTable::build(&[64 * MIB, 64 * MIB, 128 * MIB], &[0, 1, 1]).unwrap();
        assert!(h.check(&other, [1; 16], 2).unwrap_err().contains("bytes"));
    }
}
