//! Namespace operations: lookup, create, link, unlink, rename, readdir, setattr, xattrs.

use super::dir::{self, DirEntry};
use super::flags;
use super::txn::{LockSet, MetaTx, StripeGuards};
use super::xattr;
use super::{Attr, Ctx, Fs, SetAttr, SetTime, now_ns};
use crate::alloc::{AllocRequest, BlockRange};
use crate::error::{Error, Result};
use crate::format::dirent::type_byte;
use crate::format::{
    BLOCK_SIZE, INODE_INLINE_LEN, IncompatFeatures, Inode, MAX_FILE_SIZE, ROOT_INO, SYMLINK_MAX,
    V1_MAX_FILE_SIZE, XATTR_VALUE_MAX, blocks_to_bytes, file_type, inode_flags,
};
use crate::journal::Tx;
use crate::lockorder::{Rank, Ranked};
use std::collections::HashMap;

/// A readdir consumer: (inode, next offset, S_IFMT type bits, name) -> buffer full.
pub type ReaddirFn<'a> = dyn FnMut(u64, i64, u16, &[u8]) -> bool + 'a;

/// Most hard links to one inode.
pub const LINK_MAX: u32 = 65_000;
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
/// renameat2's RENAME_WHITEOUT: the source name is left pointing at a whiteout, a
/// character device 0:0 (what overlayfs reads as "deleted in this layer").
pub const RENAME_WHITEOUT: u32 = 4;
/// The mode of a whiteout: the VFS's `S_IFCHR | WHITEOUT_MODE` (0).
const WHITEOUT_MODE: u32 = file_type::S_IFCHR as u32;
const XATTR_CREATE: i32 = 1;
const XATTR_REPLACE: i32 = 2;

/// chown of anything but a directory clears set-user-ID always, and set-group-ID when the
/// group may execute or the caller is neither privileged nor in the file's group (the
/// kernel's chown_common and setattr_should_drop_sgid; FUSE passes only the caller's primary
/// group). This runs for every chown that names an owner or a group, changed or not, as the
/// kernel's does.
fn kill_privs_on_chown(ctx: &Ctx, old_gid: u32, i: &mut Inode) {
    i.mode &= !0o4000;
    if i.mode & 0o010 != 0 || (ctx.uid != 0 && ctx.gid != old_gid) {
        i.mode &= !0o2000;
    }
}

/// The two names of a rename: the source's entry `se` in `parent`, and `newname` in
/// `newparent` with its entry `de` if the name exists.
struct RenameSides<'a> {
    parent: u64,
    se: &'a DirEntry,
    newparent: u64,
    newname: &'a [u8],
    de: Option<DirEntry>,
}

impl Fs {
    fn find(&self, dir_ino: u64, dir_inode: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        dir::lookup(
            &self.reader(),
            &dir::tree(dir_ino, dir_inode.tree_root),
            name,
        )
    }

    /// The inode `name` names in directory `parent` ("." and ".." included).
    fn resolve(&self, parent: u64, name: &[u8]) -> Result<u64> {
        let p = self.dir_inode(parent)?;
        match name {
            b"." => Ok(parent),
            b".." => Ok(p.parent),
            _ => Ok(self.find(parent, &p, name)?.ok_or(Error::NotFound)?.ino),
        }
    }

    /// LOOKUP: finds `name` in `parent`, counting a kernel reference.
    ///
    /// The reference is counted while the parent and the child are read-locked: an unlink
    /// (which write-locks both and frees the child when nobody references it) either comes
    /// first, and the name is gone, or sees the reference and keeps the inode as an orphan.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        self.check_alive()?;
        if name == b"." {
            // The kernel resolves a file handle (open_by_handle_at, NFS export) whose inode
            // it no longer caches by looking up "." in that inode, whatever its type.
            let _g = self.read_lock(parent);
            let attr = Attr::from_inode(parent, &self.inodes.read(parent)?);
            self.add_lookup(parent);
            return Ok(attr);
        }
        if name.len() > crate::format::NAME_MAX {
            return Err(Error::NameTooLong);
        }
        loop {
            let child = {
                let rank = Ranked::acquire(Rank::Stripes);
                let ps = Self::stripe(parent);
                let parent_guard = self.stripes[ps].read();
                let child = self.resolve(parent, name)?;
                let cs = Self::stripe(child);
                if cs >= ps {
                    // The child's stripe comes after the parent's (or is it): take it too,
                    // in order, without letting go and looking the name up again.
                    let child_guard = (cs != ps).then(|| self.stripes[cs].read());
                    let attr = Attr::from_inode(child, &self.inodes.read(child)?);
                    self.add_lookup(child);
                    drop((child_guard, parent_guard, rank));
                    return Ok(attr);
                }
                child
            };
            // The child's stripe comes first: let go, take both in order, look again.
            let _g = self.read_lock_pair(parent, child);
            if self.resolve(parent, name)? != child {
                continue; // changed while we were not holding the locks
            }
            let attr = Attr::from_inode(child, &self.inodes.read(child)?);
            self.add_lookup(child);
            return Ok(attr);
        }
    }

    fn new_inode(&self, ctx: &Ctx, parent: &Inode, mode: u32, generation: u64) -> Inode {
        let mut mode = mode as u16;
        let mut gid = ctx.gid;
        if parent.mode & 0o2000 != 0 {
            gid = parent.gid;
            if mode & file_type::S_IFMT == file_type::S_IFDIR {
                mode |= 0o2000;
            }
        }
        let mut i = Inode::new(mode, 1, now_ns(), generation);
        i.uid = ctx.uid;
        i.gid = gid;
        i.flags = flags::inherited(parent, mode);
        i
    }

    /// Creates an inode and its entry in `parent`; `fill` completes the new inode.
    fn create_entry(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        fill: &mut dyn FnMut(&mut Tx<'_>, u64, &mut Inode) -> Result<()>,
    ) -> Result<Attr> {
        self.check_writable()?;
        dir::check_name(name)?;
        if !file_type::is_valid(mode as u16) {
            return Err(Error::Invalid);
        }
        let g = self.lock_all(&[parent]);
        let mut p = self.dir_inode(parent)?;
        if p.nlink == 0 {
            return Err(Error::NotFound);
        }
        if self.find(parent, &p, name)?.is_some() {
            return Err(Error::Exists);
        }
        flags::may_create(&p)?;
        let is_dir = mode as u16 & file_type::S_IFMT == file_type::S_IFDIR;
        if is_dir && p.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        // An inode number before the slot: growing the table takes a slot of its own.
        let reserved = self.inodes.reserve(&self.journal, &self.alloc)?;
        let mut tx = self.begin(&g, LockSet::NONE)?;
        let (ino, generation) = self.inodes.allocate(&mut tx, reserved)?;
        let mut inode = self.new_inode(ctx, &p, mode, generation);
        if is_dir {
            inode.nlink = 2;
            inode.parent = parent;
            inode.flags |= inode_flags::TREE;
            p.nlink += 1;
        }
        fill(&mut tx, ino, &mut inode)?;
        self.inodes.write(&mut tx, ino, &mut inode)?;
        let mut t = dir::tree(parent, p.tree_root);
        dir::insert(
            &mut tx,
            &self.reader(),
            &self.nodes(),
            &mut t,
            name,
            ino,
            type_byte(inode.mode),
        )?;
        p.tree_root = t.root;
        p.size += 1;
        p.mtime_ns = inode.ctime_ns;
        p.ctime_ns = inode.ctime_ns;
        self.inodes.write(&mut tx, parent, &mut p)?;
        tx.commit()?;
        self.add_lookup(ino); // under the parent's lock, like lookup
        drop(g);
        Ok(Attr::from_inode(ino, &inode))
    }

    /// MKNOD / CREATE: regular files, fifos, sockets, devices.
    pub fn mknod(&self, ctx: &Ctx, parent: u64, name: &[u8], mode: u32, rdev: u32) -> Result<Attr> {
        let t = mode as u16 & file_type::S_IFMT;
        if t == file_type::S_IFDIR || t == file_type::S_IFLNK {
            return Err(Error::Invalid);
        }
        let mode = if t == 0 {
            mode | u32::from(file_type::S_IFREG)
        } else {
            mode
        };
        self.create_entry(ctx, parent, name, mode, &mut |_, _, i| {
            i.rdev = u64::from(rdev);
            Ok(())
        })
    }

    pub fn mkdir(&self, ctx: &Ctx, parent: u64, name: &[u8], mode: u32) -> Result<Attr> {
        let mode = (mode & 0o7777) | u32::from(file_type::S_IFDIR);
        self.create_entry(ctx, parent, name, mode, &mut |_, _, _| Ok(()))
    }

    pub fn symlink(&self, ctx: &Ctx, parent: u64, name: &[u8], target: &[u8]) -> Result<Attr> {
        if target.len() > SYMLINK_MAX {
            return Err(Error::NameTooLong);
        }
        if target.is_empty() {
            return Err(Error::NotFound);
        }
        let mode = u32::from(file_type::S_IFLNK) | 0o777;
        self.create_entry(ctx, parent, name, mode, &mut |tx, _, i| {
            i.size = target.len() as u64;
            if target.len() <= INODE_INLINE_LEN {
                i.inline[..target.len()].copy_from_slice(target);
                i.inline_count = target.len() as u32;
                i.flags |= inode_flags::INLINE_DATA;
            } else {
                let r = self.alloc.allocate(
                    tx,
                    AllocRequest {
                        blocks: 1,
                        min_blocks: 1,
                        aligned: false,
                        goal: None,
                    },
                )?;
                let mut block = vec![0u8; crate::format::BLOCK_SIZE as usize];
                block[..target.len()].copy_from_slice(target);
                tx.write_new(blocks_to_bytes(r.start), &block)?;
                i.tree_root = r.start;
                i.blocks = 1;
            }
            Ok(())
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        if !i.is_symlink() {
            return Err(Error::Invalid);
        }
        let len = i.size as usize;
        if i.flags & inode_flags::INLINE_DATA != 0 {
            return i
                .inline
                .get(..len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| Error::corrupted("symlink", ino, "inline length"));
        }
        if len > SYMLINK_MAX || !self.geometry.is_data_range(i.tree_root, 1) {
            return Err(Error::corrupted("symlink", ino, "target block"));
        }
        let mut buf = vec![0u8; len];
        self.media.read(blocks_to_bytes(i.tree_root), &mut buf)?;
        Ok(buf)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        self.check_writable()?;
        dir::check_name(newname)?;
        let g = self.lock_all(&[ino, newparent]);
        let mut i = self.inodes.read(ino)?;
        if i.is_dir() {
            return Err(Error::NotPermitted);
        }
        if i.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        if i.nlink == 0 {
            return Err(Error::NotFound);
        }
        let mut p = self.dir_inode(newparent)?;
        if self.find(newparent, &p, newname)?.is_some() {
            return Err(Error::Exists);
        }
        flags::may_link(&i)?;
        flags::may_create(&p)?;
        let now = now_ns();
        let mut tx = self.begin(&g, LockSet::NONE)?;
        let mut t = dir::tree(newparent, p.tree_root);
        dir::insert(
            &mut tx,
            &self.reader(),
            &self.nodes(),
            &mut t,
            newname,
            ino,
            type_byte(i.mode),
        )?;
        p.tree_root = t.root;
        p.size += 1;
        p.mtime_ns = now;
        p.ctime_ns = now;
        self.inodes.write(&mut tx, newparent, &mut p)?;
        i.nlink += 1;
        i.ctime_ns = now;
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        self.add_lookup(ino);
        drop(g);
        Ok(Attr::from_inode(ino, &i))
    }

    /// Finds the inode behind `name` without holding locks (to learn which to take).
    fn peek(&self, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        let _g = self.read_lock(parent);
        let p = self.dir_inode(parent)?;
        Ok(self.find(parent, &p, name)?.map(|e| e.ino))
    }

    /// The locks an unlink of `inode` needs: the state record when it drops the last link
    /// (it orphans or frees the inode), the deferred-free inode when the inode is leased.
    pub(super) fn unlink_locks(&self, ino: u64, inode: &Inode) -> LockSet {
        LockSet {
            state: inode.is_dir() || inode.nlink <= 1,
            deferred: self.is_leased(ino),
            frees: true,
        }
    }

    /// Drops one link of `inode` (already decremented by the caller to its new count):
    /// frees it, or makes it an orphan while the kernel still references it. The caller
    /// holds the inode's stripe (the reference counts cannot change meanwhile).
    fn after_unlink(&self, tx: &mut MetaTx<'_>, ino: u64, inode: &mut Inode) -> Result<()> {
        if inode.nlink > 0 {
            return self.inodes.write(tx, ino, inode);
        }
        tx.require_state()?;
        let refs = self.held(ino);
        // A file with many extents may need more than one transaction to free: it becomes
        // an orphan now and is freed in bounded steps after this transaction commits.
        let big = inode.is_reg() && inode.flags & inode_flags::TREE != 0;
        if big {
            self.pending_reaps.lock().push(ino);
        } else if refs.lookups == 0 && refs.opens == 0 {
            self.release_contents(tx, ino, inode)?;
            return self.free_inode(tx, ino, inode);
        } else if refs.opens == 0 {
            self.release_contents(tx, ino, inode)?;
        }
        inode.flags |= inode_flags::ORPHAN;
        self.orphan_add(tx, ino)?;
        self.inodes.write(tx, ino, inode)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove_entry(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        if name == b"." {
            return Err(Error::Invalid);
        }
        if name == b".." {
            return Err(Error::NotEmpty);
        }
        self.remove_entry(parent, name, true)
    }

    fn remove_entry(&self, parent: u64, name: &[u8], want_dir: bool) -> Result<()> {
        self.check_writable()?;
        if name.len() > crate::format::NAME_MAX {
            return Err(Error::NameTooLong);
        }
        loop {
            let child = self.peek(parent, name)?.ok_or(Error::NotFound)?;
            let g = self.lock_all(&[parent, child]);
            let mut p = self.dir_inode(parent)?;
            let Some(entry) = self.find(parent, &p, name)? else {
                return Err(Error::NotFound);
            };
            if entry.ino != child {
                continue; // changed while we were not holding the locks
            }
            let mut c = self.inodes.read(child)?;
            let now = now_ns();
            // The flags come first, as in the VFS (may_delete): EPERM before ENOTDIR,
            // EISDIR or ENOTEMPTY.
            flags::may_delete(&p, &c)?;
            if want_dir {
                if !c.is_dir() {
                    return Err(Error::NotDir);
                }
                if c.tree_root != 0 {
                    return Err(Error::NotEmpty);
                }
            } else if c.is_dir() {
                return Err(Error::IsDir);
            }
            let mut tx = self.begin(&g, self.unlink_locks(child, &c))?;
            let mut t = dir::tree(parent, p.tree_root);
            dir::remove(&mut tx, &self.reader(), &self.nodes(), &mut t, entry.key)?;
            p.tree_root = t.root;
            p.size = p.size.saturating_sub(1);
            p.mtime_ns = now;
            p.ctime_ns = now;
            if want_dir {
                p.nlink = p.nlink.saturating_sub(1);
                c.nlink = 0;
            } else {
                c.nlink = c.nlink.saturating_sub(1);
            }
            c.ctime_ns = now;
            self.inodes.write(&mut tx, parent, &mut p)?;
            self.after_unlink(&mut tx, child, &mut c)?;
            tx.commit()?;
            drop(g);
            self.finish_pending_reaps();
            self.give_back_inode_chunks();
            return Ok(());
        }
    }

    /// True when `ancestor` is `dir` or one of its ancestors.
    fn is_ancestor(&self, ancestor: u64, mut dir: u64) -> Result<bool> {
        for _ in 0..4096 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.inodes.read(dir)?.parent;
        }
        Err(Error::corrupted(
            "directory tree",
            dir,
            "parent chain too long (a cycle?)",
        ))
    }

    /// RENAME / RENAME2 with renameat2's `flags`. With RENAME_WHITEOUT, `ctx` owns the
    /// whiteout left at the source name (as a mknod by the caller would); the whiteout, the
    /// move and the replaced target's unlink are one transaction.
    pub fn rename(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.check_writable()?;
        dir::check_name(newname)?;
        if name.len() > crate::format::NAME_MAX {
            return Err(Error::NameTooLong);
        }
        // EXCHANGE goes with neither NOREPLACE nor WHITEOUT (the kernel's rule).
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) != 0
            || (flags & RENAME_EXCHANGE != 0 && flags & (RENAME_NOREPLACE | RENAME_WHITEOUT) != 0)
        {
            return Err(Error::Invalid);
        }
        // Directory moves between parents are serialised (as the VFS does) so the ancestry
        // check cannot race another move.
        let _rename = (parent != newparent).then(|| self.rename_lock.lock());
        loop {
            let src = self.peek(parent, name)?.ok_or(Error::NotFound)?;
            let dst = self.peek(newparent, newname)?;
            let mut lock_set = vec![parent, newparent, src];
            lock_set.extend(dst);
            let g = self.lock_all(&lock_set);
            let mut set: HashMap<u64, Inode> = HashMap::new();
            set.insert(parent, self.dir_inode(parent)?);
            if newparent != parent {
                set.insert(newparent, self.dir_inode(newparent)?);
            }
            let Some(se) = self.find(parent, &set[&parent], name)? else {
                return Err(Error::NotFound);
            };
            let de = self.find(newparent, &set[&newparent], newname)?;
            if se.ino != src || de.as_ref().map(|e| e.ino) != dst {
                continue;
            }
            let sides = RenameSides {
                parent,
                se: &se,
                newparent,
                newname,
                de,
            };
            let result = self.rename_locked(ctx, &g, sides, flags, set);
            drop(g);
            self.finish_pending_reaps();
            self.give_back_inode_chunks();
            return result;
        }
    }

    fn rename_locked(
        &self,
        ctx: &Ctx,
        g: &StripeGuards<'_>,
        sides: RenameSides<'_>,
        flags: u32,
        mut set: HashMap<u64, Inode>,
    ) -> Result<()> {
        let RenameSides {
            parent,
            se,
            newparent,
            newname,
            de,
        } = sides;
        let src = se.ino;
        if de.as_ref().is_some_and(|d| d.ino == src) {
            return Ok(()); // both names are links to one inode: nothing to do
        }
        if flags & RENAME_EXCHANGE != 0 && de.is_none() {
            return Err(Error::NotFound);
        }
        if flags & RENAME_NOREPLACE != 0 && de.is_some() {
            return Err(Error::Exists);
        }
        let s_inode = self.inodes.read(src)?;
        let d_inode = match &de {
            Some(d) => Some(self.inodes.read(d.ino)?),
            None => None,
        };
        // A directory may not move below itself.
        if s_inode.is_dir() && parent != newparent && self.is_ancestor(src, newparent)? {
            return Err(Error::Invalid);
        }
        // The source leaves its directory, the target (if any) leaves the other, and the
        // new name enters it: the attribute flags of all four may forbid it (checked before
        // the types, as the VFS's may_delete does).
        flags::may_delete(&set[&parent], &s_inode)?;
        flags::may_create(&set[&newparent])?;
        if let Some(di) = &d_inode {
            flags::may_delete(&set[&newparent], di)?;
        }
        if let (Some(d), Some(di)) = (&de, &d_inode) {
            if flags & RENAME_EXCHANGE != 0 {
                if di.is_dir() && parent != newparent && self.is_ancestor(d.ino, parent)? {
                    return Err(Error::Invalid);
                }
            } else if s_inode.is_dir() && !di.is_dir() {
                return Err(Error::NotDir);
            } else if !s_inode.is_dir() && di.is_dir() {
                return Err(Error::IsDir);
            } else if di.is_dir() && di.tree_root != 0 {
                return Err(Error::NotEmpty);
            }
        }
        let whiteout = flags & RENAME_WHITEOUT != 0;
        let reserved = if whiteout {
            Some(self.inodes.reserve(&self.journal, &self.alloc)?)
        } else {
            None
        };
        set.insert(src, s_inode);
        if let (Some(d), Some(di)) = (&de, d_inode) {
            set.insert(d.ino, di);
        }
        let now = now_ns();
        // The replaced target may lose its last link.
        let locks = match (&de, &d_inode) {
            (Some(d), Some(di)) if flags & RENAME_EXCHANGE == 0 => self.unlink_locks(d.ino, di),
            _ => LockSet::NONE,
        };
        let mut tx = self.begin(g, locks)?;
        let r = self.reader();
        let nodes = self.nodes();
        let get = |set: &mut HashMap<u64, Inode>, ino: u64| -> Result<Inode> {
            set.get(&ino).copied().ok_or(Error::Invalid)
        };
        // RENAME_WHITEOUT: a new inode, stored below with the others.
        let whiteout = match reserved {
            Some(reserved) => {
                let (ino, generation) = self.inodes.allocate(&mut tx, reserved)?;
                let inode = self.new_inode(ctx, &set[&parent], WHITEOUT_MODE, generation);
                Some((ino, inode))
            }
            None => None,
        };
        // The source's entry goes away, or, with RENAME_WHITEOUT, now names the whiteout.
        let vacate = |tx: &mut Tx<'_>, t: &mut crate::btree::Tree, dir: &mut Inode| -> Result<()> {
            match &whiteout {
                Some((wino, w)) => dir::replace(tx, &r, &nodes, t, se, *wino, type_byte(w.mode)),
                None => {
                    dir::remove(tx, &r, &nodes, t, se.key)?;
                    dir.size = dir.size.saturating_sub(1);
                    Ok(())
                }
            }
        };
        if let Some(d) = &de {
            let dst = d.ino;
            if flags & RENAME_EXCHANGE != 0 {
                // Swap the two entries' targets.
                let (si, di) = (get(&mut set, src)?, get(&mut set, dst)?);
                let mut pt = get(&mut set, parent)?;
                let mut t = dir::tree(parent, pt.tree_root);
                dir::replace(&mut tx, &r, &nodes, &mut t, se, dst, type_byte(di.mode))?;
                pt.tree_root = t.root;
                set.insert(parent, pt);
                let mut npt = get(&mut set, newparent)?;
                let mut t = dir::tree(newparent, npt.tree_root);
                dir::replace(&mut tx, &r, &nodes, &mut t, d, src, type_byte(si.mode))?;
                npt.tree_root = t.root;
                set.insert(newparent, npt);
                self.move_dir_links(&mut set, src, parent, newparent)?;
                self.move_dir_links(&mut set, dst, newparent, parent)?;
            } else {
                // Replace the target: the new entry points at src, dst loses a link.
                let si = get(&mut set, src)?;
                let mut npt = get(&mut set, newparent)?;
                let mut t = dir::tree(newparent, npt.tree_root);
                dir::replace(&mut tx, &r, &nodes, &mut t, d, src, type_byte(si.mode))?;
                npt.tree_root = t.root;
                set.insert(newparent, npt);
                let mut pt = get(&mut set, parent)?;
                let mut t = dir::tree(parent, pt.tree_root);
                vacate(&mut tx, &mut t, &mut pt)?;
                pt.tree_root = t.root;
                set.insert(parent, pt);
                let mut di = get(&mut set, dst)?;
                if di.is_dir() {
                    di.nlink = 0;
                    let mut np = get(&mut set, newparent)?;
                    np.nlink = np.nlink.saturating_sub(1);
                    set.insert(newparent, np);
                } else {
                    di.nlink = di.nlink.saturating_sub(1);
                }
                di.ctime_ns = now;
                set.insert(dst, di);
                self.move_dir_links(&mut set, src, parent, newparent)?;
            }
        } else {
            let si = get(&mut set, src)?;
            let mut pt = get(&mut set, parent)?;
            let mut t = dir::tree(parent, pt.tree_root);
            vacate(&mut tx, &mut t, &mut pt)?;
            pt.tree_root = t.root;
            set.insert(parent, pt);
            let mut npt = get(&mut set, newparent)?;
            let mut t = dir::tree(newparent, npt.tree_root);
            dir::insert(
                &mut tx,
                &r,
                &nodes,
                &mut t,
                newname,
                src,
                type_byte(si.mode),
            )?;
            npt.tree_root = t.root;
            npt.size += 1;
            set.insert(newparent, npt);
            self.move_dir_links(&mut set, src, parent, newparent)?;
        }
        for ino in [parent, newparent] {
            if let Some(i) = set.get_mut(&ino) {
                i.mtime_ns = now;
                i.ctime_ns = now;
            }
        }
        if let Some(i) = set.get_mut(&src) {
            i.ctime_ns = now;
        }
        if let Some((wino, mut w)) = whiteout {
            self.inodes.write(&mut tx, wino, &mut w)?;
        }
        let dst = de.as_ref().map(|d| d.ino);
        for (ino, mut inode) in set {
            if Some(ino) == dst && inode.nlink == 0 {
                self.after_unlink(&mut tx, ino, &mut inode)?;
            } else {
                self.inodes.write(&mut tx, ino, &mut inode)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A directory that moved to another parent: fix `..` and the parents' link counts.
    fn move_dir_links(
        &self,
        set: &mut HashMap<u64, Inode>,
        src: u64,
        from: u64,
        to: u64,
    ) -> Result<()> {
        if from == to {
            return Ok(());
        }
        let Some(s) = set.get_mut(&src) else {
            return Err(Error::Invalid);
        };
        if !s.is_dir() {
            return Ok(());
        }
        s.parent = to;
        if let Some(f) = set.get_mut(&from) {
            f.nlink = f.nlink.saturating_sub(1);
        }
        if let Some(t) = set.get_mut(&to) {
            t.nlink += 1;
        }
        Ok(())
    }

    /// READDIR: entries from `offset` (0 = start; 1 = after "."; 2 = after ".."; k + 3 =
    /// after the entry with key k). `f` returns true when the reply buffer is full.
    pub fn readdir(&self, ino: u64, offset: i64, f: &mut ReaddirFn<'_>) -> Result<()> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        let d = self.dir_inode(ino)?;
        if offset < 1 && f(ino, 1, file_type::S_IFDIR, b".") {
            return Ok(());
        }
        if offset < 2 && f(d.parent, 2, file_type::S_IFDIR, b"..") {
            return Ok(());
        }
        let from = (offset.max(2) - 2) as u64;
        dir::list(
            &self.reader(),
            &dir::tree(ino, d.tree_root),
            from,
            &mut |e| {
                let next = (e.key + 3) as i64;
                !f(e.ino, next, e.file_type(), &e.name)
            },
        )
    }

    /// READDIRPLUS: as readdir, with attributes; counts a reference per accepted entry
    /// other than "." and "..".
    pub fn readdirplus(
        &self,
        ino: u64,
        offset: i64,
        f: &mut dyn FnMut(&Attr, i64, &[u8]) -> bool,
    ) -> Result<()> {
        let mut entries: Vec<(u64, i64, Vec<u8>)> = Vec::new();
        self.readdir(ino, offset, &mut |child, next, _, name| {
            entries.push((child, next, name.to_vec()));
            entries.len() >= 256
        })?;
        for (child, next, name) in entries {
            // The reference is counted under the child's lock (see lookup): an inode freed
            // meanwhile is skipped, never referenced.
            let _g = self.read_lock(child);
            let attr = match self.inodes.read(child) {
                Ok(i) => Attr::from_inode(child, &i),
                Err(Error::NotFound) => continue, // removed meanwhile
                Err(e) => return Err(e),
            };
            if f(&attr, next, &name) {
                break;
            }
            if name != b"." && name != b".." {
                self.add_lookup(child);
            }
        }
        Ok(())
    }

    /// SETATTR.
    pub fn setattr(&self, ctx: &Ctx, ino: u64, s: &SetAttr) -> Result<Attr> {
        self.check_writable()?;
        let g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        flags::may_setattr(&i, s)?;
        let now = now_ns();
        let shrinks = i.is_reg() && s.size.is_some_and(|size| size < i.size);
        if let Some(size) = s.size {
            if shrinks {
                // A truncate over many extents frees them in steps first.
                self.punch_in_steps(&g, ino, size.div_ceil(BLOCK_SIZE), u64::MAX, true)?;
                i = self.inodes.read(ino)?;
            }
        }
        if s.size
            .is_some_and(|size| size > V1_MAX_FILE_SIZE && size <= MAX_FILE_SIZE)
        {
            self.require_features(IncompatFeatures::LARGE_FILES)?;
        }
        let locks = LockSet {
            state: false,
            deferred: s.size.is_some() && self.is_leased(ino),
            frees: shrinks,
        };
        let mut tx = self.begin(&g, locks)?;
        if let Some(mode) = s.mode {
            i.mode = (i.mode & file_type::S_IFMT) | (mode as u16 & 0o7777);
        }
        let old_gid = i.gid;
        if let Some(uid) = s.uid {
            i.uid = uid;
        }
        if let Some(gid) = s.gid {
            i.gid = gid;
        }
        // The daemon clears set-user/group-ID itself (FUSE_HANDLE_KILLPRIV_V2: the kernel
        // then leaves it to us and sends no mode with the change). An explicit mode wins:
        // it is what the caller, or an older kernel doing the clearing itself, asked for.
        if s.mode.is_none() && !i.is_dir() {
            if s.uid.is_some() || s.gid.is_some() {
                kill_privs_on_chown(ctx, old_gid, &mut i);
            }
            if s.size.is_some() {
                super::data::kill_privs(ctx, &mut i);
            }
        }
        if let Some(size) = s.size {
            if i.is_dir() {
                return Err(Error::IsDir);
            }
            if !i.is_reg() {
                return Err(Error::Invalid);
            }
            if size > MAX_FILE_SIZE {
                return Err(Error::FileTooBig);
            }
            self.set_size(&mut tx, ino, &mut i, size)?;
            i.mtime_ns = now;
        }
        let t = |st: SetTime| match st {
            SetTime::Now => now,
            SetTime::At(v) => v,
        };
        if let Some(a) = s.atime {
            i.atime_ns = t(a);
        }
        if let Some(m) = s.mtime {
            i.mtime_ns = t(m);
        }
        i.ctime_ns = s.ctime.unwrap_or(now);
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(Attr::from_inode(ino, &i))
    }

    fn check_xattr_name(name: &[u8]) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::Range);
        }
        let ok = [&b"user."[..], b"trusted.", b"security."]
            .iter()
            .any(|p| name.starts_with(p) && name.len() > p.len())
            || name == b"system.posix_acl_access"
            || name == b"system.posix_acl_default";
        if ok { Ok(()) } else { Err(Error::NotSupported) }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        let attrs = xattr::load(self.media.as_ref(), &self.geometry, ino, &i)?;
        attrs
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(Error::NoAttr)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        self.check_alive()?;
        let _g = self.read_lock(ino);
        let i = self.inodes.read(ino)?;
        let mut out = Vec::new();
        for (n, _) in xattr::load(self.media.as_ref(), &self.geometry, ino, &i)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.check_writable()?;
        Self::check_xattr_name(name)?;
        if value.len() > XATTR_VALUE_MAX {
            return Err(Error::TooBig);
        }
        self.change_xattrs(ino, &mut |attrs| {
            let pos = attrs.iter().position(|(n, _)| n == name);
            match (pos, flags & (XATTR_CREATE | XATTR_REPLACE)) {
                (Some(_), XATTR_CREATE) => Err(Error::Exists),
                (None, XATTR_REPLACE) => Err(Error::NoAttr),
                (Some(p), _) => {
                    attrs[p].1 = value.to_vec();
                    Ok(())
                }
                (None, _) => {
                    attrs.push((name.to_vec(), value.to_vec()));
                    Ok(())
                }
            }
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.change_xattrs(ino, &mut |attrs| {
            let p = attrs
                .iter()
                .position(|(n, _)| n == name)
                .ok_or(Error::NoAttr)?;
            attrs.remove(p);
            Ok(())
        })
    }

    fn change_xattrs(
        &self,
        ino: u64,
        change: &mut dyn FnMut(&mut xattr::Attrs) -> Result<()>,
    ) -> Result<()> {
        let g = self.lock_all(&[ino]);
        let mut i = self.inodes.read(ino)?;
        flags::may_change_xattrs(&i)?;
        let mut attrs = xattr::load(self.media.as_ref(), &self.geometry, ino, &i)?;
        change(&mut attrs)?;
        let image = xattr::encode(ino, &attrs)?;
        let mut tx = self.begin(&g, LockSet::NONE)?;
        let old = (i.xattr_block, u64::from(i.xattr_blocks));
        match image {
            Some(img) => {
                let blocks = img.len() as u64 / crate::format::BLOCK_SIZE;
                let r = self.alloc.allocate(
                    &mut tx,
                    AllocRequest {
                        blocks,
                        min_blocks: blocks,
                        aligned: false,
                        goal: None,
                    },
                )?;
                tx.write_new(blocks_to_bytes(r.start), &img)?;
                i.xattr_block = r.start;
                i.xattr_blocks = blocks as u32;
            }
            None => {
                i.xattr_block = 0;
                i.xattr_blocks = 0;
            }
        }
        if old.0 != 0 {
            self.alloc.free(
                &mut tx,
                BlockRange {
                    start: old.0,
                    len: old.1,
                },
            )?;
        }
        i.ctime_ns = now_ns();
        self.inodes.write(&mut tx, ino, &mut i)?;
        tx.commit()?;
        Ok(())
    }
}
