//! POSIX ACLs in their xattr form (`system.posix_acl_access`, `system.posix_acl_default`).
//!
//! With `FUSE_POSIX_ACL` the kernel enforces ACLs and caches them, but leaves three duties to
//! the file system (include/uapi/linux/fuse.h, fs/fuse/acl.c):
//! - keep the mode in step when an access ACL is set ([`Acl::apply_to_mode`]), and drop an
//!   ACL that says no more than the mode ([`Acl::equivalent_mode`]);
//! - keep the ACL in step on chmod ([`Acl::chmod`]);
//! - give new inodes the ACLs their directory's default ACL prescribes
//!   ([`Acl::inherit`]), in place of the umask (so the kernel is told not to apply it:
//!   `FUSE_DONT_MASK`).
//!
//! The layout is the kernel's `posix_acl_xattr`: a little-endian u32 version (2), then
//! 8-byte entries (u16 tag, u16 permissions, u32 id), sorted by tag then id.

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER: usize = 4;
const ENTRY: usize = 8;

pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;

/// One ACL entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// A parsed ACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    pub entries: Vec<Entry>,
}

impl Acl {
    /// Parses the xattr form; `None` if it is malformed (the kernel validates ACLs before
    /// sending them, so this only guards stored values).
    pub fn parse(b: &[u8]) -> Option<Acl> {
        if b.len() < HEADER || (b.len() - HEADER) % ENTRY != 0 {
            return None;
        }
        let version = u32::from_le_bytes(b[..HEADER].try_into().ok()?);
        if version != VERSION {
            return None;
        }
        let entries = b[HEADER..]
            .chunks_exact(ENTRY)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Some(Acl { entries })
    }

    /// The xattr form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    fn perm_of(&self, tag: u16) -> Option<u16> {
        self.entries.iter().find(|e| e.tag == tag).map(|e| e.perm)
    }

    fn set_perm(&mut self, tag: u16, perm: u16) {
        for e in self.entries.iter_mut().filter(|e| e.tag == tag) {
            e.perm = perm & 7;
        }
    }

    /// The permission bits this ACL amounts to, if it has only the three base entries
    /// (then it says no more than the mode and need not be stored).
    pub fn equivalent_mode(&self) -> Option<u32> {
        if self
            .entries
            .iter()
            .any(|e| !matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
        {
            return None;
        }
        Some(self.mode_bits())
    }

    /// rwx bits for owner, group class (the mask if there is one) and other.
    fn mode_bits(&self) -> u32 {
        let owner = u32::from(self.perm_of(USER_OBJ).unwrap_or(0) & 7);
        let group = u32::from(
            self.perm_of(MASK)
                .or_else(|| self.perm_of(GROUP_OBJ))
                .unwrap_or(0)
                & 7,
        );
        let other = u32::from(self.perm_of(OTHER).unwrap_or(0) & 7);
        (owner << 6) | (group << 3) | other
    }

    /// The mode after setting this as the access ACL: the rwx bits follow the ACL, the
    /// type and set-id/sticky bits stay.
    pub fn apply_to_mode(&self, mode: u32) -> u32 {
        (mode & !0o777) | self.mode_bits()
    }

    /// chmod: the ACL's owner, group class (mask, else group) and other entries take the new
    /// mode's bits.
    pub fn chmod(&mut self, mode: u32) {
        self.set_perm(USER_OBJ, ((mode >> 6) & 7) as u16);
        let group_tag = if self.perm_of(MASK).is_some() {
            MASK
        } else {
            GROUP_OBJ
        };
        self.set_perm(group_tag, ((mode >> 3) & 7) as u16);
        self.set_perm(OTHER, (mode & 7) as u16);
    }

    /// A new inode under a directory with this default ACL, created with `mode` (no umask
    /// applied): returns the mode to create it with and its access ACL, `None` when the
    /// result is equivalent to the mode (the kernel's `posix_acl_create`).
    pub fn inherit(&self, mode: u32) -> (u32, Option<Acl>) {
        let mut acl = self.clone();
        let mut new_mode = mode;
        let has_mask = acl.perm_of(MASK).is_some();
        for e in &mut acl.entries {
            match e.tag {
                USER_OBJ => {
                    e.perm &= ((mode >> 6) & 7) as u16;
                    new_mode = (new_mode & !0o700) | (u32::from(e.perm) << 6);
                }
                OTHER => {
                    e.perm &= (mode & 7) as u16;
                    new_mode = (new_mode & !0o007) | u32::from(e.perm);
                }
                MASK => {
                    e.perm &= ((mode >> 3) & 7) as u16;
                    new_mode = (new_mode & !0o070) | (u32::from(e.perm) << 3);
                }
                GROUP_OBJ if !has_mask => {
                    e.perm &= ((mode >> 3) & 7) as u16;
                    new_mode = (new_mode & !0o070) | (u32::from(e.perm) << 3);
                }
                _ => {}
            }
        }
        if acl.equivalent_mode().is_some() {
            (new_mode, None)
        } else {
            (new_mode, Some(acl))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl {
            entries: entries
                .iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect(),
        }
    }

    #[test]
    fn encode_parse_round_trip() {
        let a = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 5, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 5, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        let b = a.encode();
        assert_eq!(b.len(), 4 + 5 * 8);
        assert_eq!(Acl::parse(&b), Some(a));
        assert_eq!(Acl::parse(&b[..7]), None);
        assert_eq!(Acl::parse(&[1, 0, 0, 0]), None);
    }

    #[test]
    fn base_entries_are_equivalent_to_a_mode() {
        let a = acl(&[(USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 0, 0)]);
        assert_eq!(a.equivalent_mode(), Some(0o640));
        let b = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 7, 12),
            (GROUP_OBJ, 4, 0),
            (MASK, 7, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(b.equivalent_mode(), None);
        // the group class of the mode is the mask
        assert_eq!(b.apply_to_mode(0o104000), 0o104670);
    }

    #[test]
    fn chmod_updates_the_mask_not_the_group() {
        let mut a = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 12),
            (GROUP_OBJ, 7, 0),
            (MASK, 7, 0),
            (OTHER, 7, 0),
        ]);
        a.chmod(0o750);
        assert_eq!(a.perm_of(USER_OBJ), Some(7));
        assert_eq!(a.perm_of(MASK), Some(5));
        assert_eq!(a.perm_of(GROUP_OBJ), Some(7));
        assert_eq!(a.perm_of(OTHER), Some(0));
    }

    #[test]
    fn inheritance_masks_the_default_acl_with_the_mode() {
        let def = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 12),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]);
        let (mode, access) = def.inherit(0o100666);
        assert_eq!(mode, 0o100664);
        let access = access.unwrap();
        assert_eq!(access.perm_of(USER_OBJ), Some(6));
        assert_eq!(access.perm_of(USER), Some(7));
        assert_eq!(access.perm_of(MASK), Some(6));
        assert_eq!(access.perm_of(OTHER), Some(4));
        // a default ACL of base entries only: the mode alone, no access ACL
        let base = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 0, 0), (OTHER, 0, 0)]);
        assert_eq!(base.inherit(0o40777), (0o40700, None));
    }
}
