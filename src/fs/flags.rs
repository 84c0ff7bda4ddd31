//! Inode attribute flags (chattr(1)): reading and setting them, and the rules they impose
//! on every other operation, which call the checks here. The rules are ext4's (the VFS's
//! `may_delete`, `may_create`, `may_setattr`, `may_open`, `xattr_permission`,
//! `vfs_fallocate`, and ext4's own write checks): FUSE never tells the kernel about these
//! flags (its inodes carry no S_IMMUTABLE or S_APPEND), so the kernel checks none of them
//! and pmfs must check all.

use super::txn::LockSet;
use super::{Attr, Ctx, Fs, SetAttr, SetTime, now_ns};
use crate::error::{Error, Result};
use crate::format::{IncompatFeatures, Inode, inode_flags};

/// Flags that forbid changing or removing the inode (and, on a directory, removing entries).
const PINNED: u16 = inode_flags::IMMUTABLE | inode_flags::APPEND;

/// EPERM when `i` carries any of `flags`.
fn refuse(i: &Inode, flags: u16) -> Result<()> {
    if i.flags & flags != 0 {
        Err(Error::NotPermitted)
    } else {
        Ok(())
    }
}

/// An entry may be removed from (or renamed out of, or replaced in) directory `dir`, and
/// the inode `victim` it names may lose it: neither is immutable or append-only.
pub(super) fn may_delete(dir: &Inode, victim: &Inode) -> Result<()> {
    refuse(dir, PINNED)?;
    refuse(victim, PINNED)
}

/// An entry may be added to directory `dir` (append-only directories take new entries).
pub(super) fn may_create(dir: &Inode) -> Result<()> {
    refuse(dir, inode_flags::IMMUTABLE)
}

/// `inode` may get another hard link.
pub(super) fn may_link(inode: &Inode) -> Result<()> {
    refuse(inode, PINNED)
}

/// An open with open(2)'s `flags`: nothing that can write an immutable file; an append-only
/// file only with O_APPEND, never with O_TRUNC.
pub(super) fn may_open(i: &Inode, flags: i32) -> Result<()> {
    let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
    let truncates = flags & libc::O_TRUNC != 0;
    if i.flags & inode_flags::IMMUTABLE != 0 && (writes || truncates) {
        return Err(Error::NotPermitted);
    }
    if i.flags & inode_flags::APPEND != 0 && (truncates || (writes && flags & libc::O_APPEND == 0))
    {
        return Err(Error::NotPermitted);
    }
    Ok(())
}

/// A write of data at `offset`: never into an immutable file, only at the end of an
/// append-only one (an O_APPEND write arrives at the size the kernel knows, which is
/// the file's: every change goes through this mount).
pub(super) fn may_write(i: &Inode, offset: u64) -> Result<()> {
    refuse(i, inode_flags::IMMUTABLE)?;
    if i.flags & inode_flags::APPEND != 0 && offset != i.size {
        return Err(Error::NotPermitted);
    }
    Ok(())
}

/// fallocate `mode`: nothing on an immutable file; on an append-only file only plain
/// preallocation (with or without KEEP_SIZE), which changes no byte.
pub(super) fn may_fallocate(i: &Inode, mode: i32) -> Result<()> {
    refuse(i, inode_flags::IMMUTABLE)?;
    if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
        refuse(i, inode_flags::APPEND)?;
    }
    Ok(())
}

/// setattr: an immutable inode changes in nothing; an append-only one may only have its
/// times set to now (utime(NULL), "touch"), as `may_setattr` and truncate's checks say.
pub(super) fn may_setattr(i: &Inode, s: &SetAttr) -> Result<()> {
    let touches = matches!(s.atime, Some(SetTime::Now)) || matches!(s.mtime, Some(SetTime::Now));
    let sets_time =
        matches!(s.atime, Some(SetTime::At(_))) || matches!(s.mtime, Some(SetTime::At(_)));
    if s.mode.is_some() || s.uid.is_some() || s.gid.is_some() || s.size.is_some() || sets_time {
        refuse(i, PINNED)?;
    }
    if touches {
        refuse(i, inode_flags::IMMUTABLE)?;
    }
    Ok(())
}

/// Setting or removing an xattr (ACLs included).
pub(super) fn may_change_xattrs(i: &Inode) -> Result<()> {
    refuse(i, PINNED)
}

/// Reads leave atime alone on a `NOATIME` inode.
pub(super) fn keeps_atime(i: &Inode) -> bool {
    i.flags & inode_flags::NOATIME != 0
}

/// The attribute flags a new inode of `mode` takes from its directory `parent`.
pub(super) fn inherited(parent: &Inode, mode: u16) -> u16 {
    let mut f = parent.flags & inode_flags::INHERITED;
    if mode & crate::format::file_type::S_IFMT != crate::format::file_type::S_IFDIR {
        f &= !inode_flags::DIRSYNC;
    }
    f
}

impl Fs {
    /// FS_IOC_GETFLAGS: the inode's attribute flags (`inode_flags::ATTR_FLAGS` bits).
    pub fn attr_flags(&self, ino: u64) -> Result<u16> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        Ok(self.inodes.read(ino)?.flags & inode_flags::ATTR_FLAGS)
    }

    /// FS_IOC_SETFLAGS: replaces the inode's attribute flags with `flags`. Only the owner or
    /// root may (EPERM otherwise), and only root (CAP_LINUX_IMMUTABLE) may set or clear
    /// immutable and append-only; the change is allowed on an immutable inode (it is how
    /// the flag comes off). A bit outside `ATTR_FLAGS` is EOPNOTSUPP.
    pub fn set_attr_flags(&self, ctx: &Ctx, ino: u64, flags: u16) -> Result<Attr> {
        self.check_writable()?;
        if flags & !inode_flags::ATTR_FLAGS != 0 {
            return Err(Error::NotSupported);
        }
        if flags != 0 {
            self.require_features(IncompatFeatures::INODE_ATTR_FLAGS)?;
        }
        let g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        if ctx.uid != 0 && ctx.uid != i.uid {
            return Err(Error::NotPermitted);
        }
        let old = i.flags & inode_flags::ATTR_FLAGS;
        if ctx.uid != 0 && (old ^ flags) & PINNED != 0 {
            return Err(Error::NotPermitted);
        }
        if old == flags {
            return Ok(Attr::from_inode(ino, &i));
        }
        if (flags & !old) & PINNED != 0 {
            // Direct clients (the preload library) store without asking: the stores under
            // way land before the inode turns immutable or append-only, and the odd slot
            // keeps new ones from starting (see `Publisher::wait_for_stores`).
            self.publisher
                .wait_for_stores(ino, std::time::Duration::from_secs(1));
        }
        let mut tx = self.begin(&g, LockSet::NONE)?;
        i.flags = (i.flags & !inode_flags::ATTR_FLAGS) | flags;
        i.ctime_ns = now_ns();
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(Attr::from_inode(ino, &i))
    }
}
