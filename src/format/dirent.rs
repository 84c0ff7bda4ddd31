//! Directory entries: the one codec of a directory leaf record (docs/FORMAT.md,
//! "Directories"), shared by the core (`fs::dir`), the checker and the repair.
//!
//! A directory leaf record is keyed `name_hash(name) << 16 | sequence` and its payload is
//! [`DIRENT_FIXED`] bytes (inode number, file type, name length) and then the name. Decoding
//! is strict: it accepts exactly the entries the core writes, whose names passed
//! [`check_name`]. The repair needs no lenient mode: an entry that does not decode is dropped,
//! which is the verdict a lenient decode followed by the name rule would give too.

use super::{DIRENT_FIXED, NAME_MAX};

/// Hash of a name: the top 46 bits of FNV-1a 64 (stable: part of the format).
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h >> 18
}

/// The file-type byte of an entry naming an inode of `mode`: `S_IFMT >> 12` (the `DT_*`
/// value).
pub fn type_byte(mode: u16) -> u8 {
    ((mode & super::file_type::S_IFMT) >> 12) as u8
}

/// Why a name cannot be stored in a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name longer than {NAME_MAX} bytes")]
    TooLong,
    #[error("empty name")]
    Empty,
    #[error("name contains '/' or NUL")]
    BadByte,
    #[error("'.' and '..' are not stored")]
    Dot,
}

/// The rule for a stored name: 1..=255 bytes, no '/' or NUL, not "." or "..".
pub fn check_name(name: &[u8]) -> Result<(), NameError> {
    if name.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(NameError::BadByte);
    }
    if name == b"." || name == b".." {
        return Err(NameError::Dot);
    }
    Ok(())
}

/// Why a directory leaf record does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirentDamage {
    #[error("payload shorter than its fixed part")]
    Short,
    #[error("name length does not match the payload")]
    Length,
    #[error("inode number 0")]
    NullIno,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("key does not match the name's hash")]
    Hash,
}

/// A directory entry: a leaf record of a directory tree, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub key: u64,
    pub ino: u64,
    /// File type: S_IFMT bits >> 12.
    pub kind: u8,
    pub name: Vec<u8>,
}

impl DirEntry {
    /// Decodes the record with key `key` and payload `p`.
    pub fn decode(key: u64, p: &[u8]) -> Result<Self, DirentDamage> {
        let (fixed, name) = p
            .split_at_checked(DIRENT_FIXED)
            .ok_or(DirentDamage::Short)?;
        let (ino, rest) = fixed.split_at(8);
        let ino = u64::from_le_bytes(ino.try_into().map_err(|_| DirentDamage::Short)?);
        if name.len() != usize::from(rest[1]) {
            return Err(DirentDamage::Length);
        }
        if ino == 0 {
            return Err(DirentDamage::NullIno);
        }
        check_name(name)?;
        if key >> 16 != name_hash(name) {
            return Err(DirentDamage::Hash);
        }
        Ok(Self {
            key,
            ino,
            kind: rest[0],
            name: name.to_vec(),
        })
    }

    /// The file type the entry records, as `S_IFMT` bits.
    pub fn file_type(&self) -> u16 {
        u16::from(self.kind) << 12
    }

    /// The record's payload.
    pub fn payload(&self) -> Vec<u8> {
        payload(self.ino, self.kind, &self.name)
    }
}

/// The payload of an entry naming `ino` (a name that passed [`check_name`]).
pub fn payload(ino: u64, kind: u8, name: &[u8]) -> Vec<u8> {
    debug_assert!(check_name(name).is_ok());
    let mut p = Vec::with_capacity(DIRENT_FIXED + name.len());
    p.extend_from_slice(&ino.to_le_bytes());
    p.push(kind);
    p.push(name.len() as u8);
    p.extend_from_slice(name);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ino: u64, name: &[u8]) -> (u64, Vec<u8>) {
        let mut p = ino.to_le_bytes().to_vec();
        p.push(8);
        p.push(name.len() as u8);
        p.extend_from_slice(name);
        (name_hash(name) << 16 | 3, p)
    }

    #[test]
    fn round_trip() {
        let e = DirEntry {
            key: name_hash(b"file") << 16 | 1,
            ino: 42,
            kind: 8,
            name: b"file".to_vec(),
        };
        assert_eq!(DirEntry::decode(e.key, &e.payload()), Ok(e));
    }

    /// The core's decoder used to accept these, repair's did not: one strict rule now.
    #[test]
    fn names_the_core_never_writes_do_not_decode() {
        for name in [&b"."[..], b"..", b"a/b", b"a\0b"] {
            let (k, p) = record(5, name);
            assert!(
                matches!(DirEntry::decode(k, &p), Err(DirentDamage::Name(_))),
                "{name:?}"
            );
        }
        let (k, p) = record(5, b"..a");
        assert!(DirEntry::decode(k, &p).is_ok());
    }

    #[test]
    fn malformed_payloads() {
        let (k, mut p) = record(5, b"x");
        assert_eq!(DirEntry::decode(k, &p[..9]), Err(DirentDamage::Short));
        assert_eq!(DirEntry::decode(k + (1 << 16), &p), Err(DirentDamage::Hash));
        p.push(b'y');
        assert_eq!(DirEntry::decode(k, &p), Err(DirentDamage::Length));
        let (k, p) = record(0, b"x");
        assert_eq!(DirEntry::decode(k, &p), Err(DirentDamage::NullIno));
        let (k, p) = record(5, b"");
        assert_eq!(
            DirEntry::decode(k, &p),
            Err(DirentDamage::Name(NameError::Empty))
        );
    }
}
