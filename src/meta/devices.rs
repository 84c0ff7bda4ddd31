//! Reading a multi-device file system's layout: the device table in member 0 and the member
//! headers of the others, and putting the named devices together into the one
//! [`DeviceSet`] the layers above see ([`assemble`]).
//!
//! The devices are named by the user (mount's device field plus `-o device=...`, fsck's
//! arguments) in any order after the first, which must be member 0 (the one with the
//! superblock, as the fstab device field). Every member header is checked against the table:
//! a device of another file system, a member given twice, a missing member or one whose size
//! or place disagrees with the table refuses the whole set with one line naming the device.

use crate::device::{DeviceSet, Media, SetMember};
use crate::error::Result;
use crate::format::devices::{
    DEVICE_TABLE_OFFSET, DeviceTable, MemberHeader, NODE_UNKNOWN, is_multi_device,
};
use crate::format::{FormatError, SUPERBLOCK_OFFSET, Superblock, format_uuid};
use std::path::PathBuf;
use std::sync::Arc;

/// Reads and validates the device table of a file system whose superblock is `sb`, on
/// `media` (member 0 alone, or the assembled set): `None` without
/// [`crate::format::IncompatFeatures::MULTI_DEVICE`].
pub fn read_device_table(media: &dyn Media, sb: &Superblock) -> Result<Option<DeviceTable>> {
    if !is_multi_device(sb) {
        return Ok(None);
    }
    let mut buf = vec![0u8; size_of::<DeviceTable>()];
    media.read(DEVICE_TABLE_OFFSET, &mut buf)?;
    let table = DeviceTable::decode(&buf)?;
    table.check_superblock(sb)?;
    Ok(Some(table))
}

/// Blocks allocated for the layout itself (gaps and member headers,
/// [`DeviceTable::reserved_blocks`]); empty on a single device.
pub fn reserved_blocks(media: &dyn Media, sb: &Superblock) -> Result<Vec<(u64, u64)>> {
    Ok(read_device_table(media, sb)?
        .map(|t| t.reserved_blocks())
        .unwrap_or_default())
}

/// A device as the user named it.
#[derive(Clone, Debug)]
pub struct NamedMedia {
    pub name: PathBuf,
    pub media: Arc<dyn Media>,
}

/// One member of an assembled file system.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub name: PathBuf,
    /// Logical byte range of the member.
    pub base: u64,
    pub size: u64,
    /// The node the device table records ([`NODE_UNKNOWN`] if none).
    pub node: u32,
}

/// The devices of one file system, put together.
#[derive(Debug)]
pub struct Assembled {
    /// What to mount or check: the one device, or the [`DeviceSet`] of all members.
    pub media: Arc<dyn Media>,
    /// The members in order (empty for a single-device file system).
    pub members: Vec<MemberInfo>,
}

/// Why devices cannot be put together: one line, starting with the device it is about.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", device.display())]
pub struct AssembleError {
    pub device: PathBuf,
    pub reason: String,
}

fn refuse(device: &NamedMedia, reason: impl Into<String>) -> AssembleError {
    AssembleError {
        device: device.name.clone(),
        reason: reason.into(),
    }
}

fn read_header(d: &NamedMedia) -> std::result::Result<MemberHeader, String> {
    let mut buf = vec![0u8; size_of::<MemberHeader>()];
    d.media
        .read(0, &mut buf)
        .map_err(|e| format!("cannot read a member header: {e}"))?;
    MemberHeader::decode(&buf).map_err(|e| match e {
        FormatError::BadMagic => "not a member of a multi-device pmfs file system".to_string(),
        e => format!("damaged member header: {e}"),
    })
}

/// Puts `devices` (the first is member 0, the rest in any order) together. A single device
/// that is not multi-device comes back as it is, its superblock unchecked (the mount or
/// fsck reports what is wrong with it as for any device); so does one whose superblock does
/// not decode, unless other devices were named (then this is refused) or it is a member
/// other than member 0 (then the line says whose).
pub fn assemble(devices: Vec<NamedMedia>) -> std::result::Result<Assembled, AssembleError> {
    let Some(first) = devices.first() else {
        return Err(AssembleError {
            device: PathBuf::from("(none)"),
            reason: "no device named".into(),
        });
    };
    let mut buf = vec![0u8; size_of::<Superblock>()];
    let sb = first
        .media
        .read(SUPERBLOCK_OFFSET, &mut buf)
        .ok()
        .and_then(|()| Superblock::decode(&buf).ok());
    let Some(sb) = sb.filter(is_multi_device) else {
        if let Ok(h) = read_header(first) {
            return Err(refuse(
                first,
                format!(
                    "is member {} of {} of file system {}, not its first device: name the \
                     first device first, then the others (with -o device=PATH when \
                     mounting)",
                    h.index,
                    h.count,
                    format_uuid(&h.uuid)
                ),
            ));
        }
        if devices.len() > 1 {
            let why = if sb.is_some() {
                "is a single-device file system, yet more devices were named"
            } else {
                "has no valid pmfs superblock (a file system over several devices is named \
                 by its first device)"
            };
            return Err(refuse(first, why));
        }
        return Ok(Assembled {
            media: Arc::clone(&first.media),
            members: Vec::new(),
        });
    };
    let table = match read_device_table(first.media.as_ref(), &sb) {
        Ok(Some(t)) => t,
        Ok(None) => unreachable!("filtered on MULTI_DEVICE above"),
        Err(e) => return Err(refuse(first, format!("device table: {e}"))),
    };
    let entries = table.members();
    let mut slots: Vec<Option<&NamedMedia>> = vec![None; entries.len()];
    slots[0] = Some(first);
    for d in &devices[1..] {
        let h = read_header(d).map_err(|r| refuse(d, r))?;
        let index = h.index as usize;
        if h.uuid == sb.uuid && (index == 0 || index >= entries.len()) {
            return Err(refuse(
                d,
                format!("member index {index} out of range (damaged member header?)"),
            ));
        }
        h.check(&table, sb.uuid, index).map_err(|r| refuse(d, r))?;
        if let Some(other) = slots[index] {
            return Err(refuse(
                d,
                format!(
                    "member {index} was already named as {}",
                    other.name.display()
                ),
            ));
        }
        slots[index] = Some(d);
    }
    let mut members = Vec::with_capacity(entries.len());
    let mut set = Vec::with_capacity(entries.len());
    for (k, (slot, e)) in slots.iter().zip(entries).enumerate() {
        let Some(d) = slot else {
            let node = if e.node == NODE_UNKNOWN {
                String::new()
            } else {
                format!(", node {}", e.node)
            };
            return Err(refuse(
                first,
                format!(
                    "member {k} of {} ({} bytes{node}) was not named: name it too (with -o \
                     device=PATH when mounting)",
                    entries.len(),
                    e.size
                ),
            ));
        };
        if d.media.size() < e.size {
            return Err(refuse(
                d,
                format!(
                    "member {k} is {} bytes, the file system uses {} of it (truncated?)",
                    d.media.size(),
                    e.size
                ),
            ));
        }
        members.push(MemberInfo {
            name: d.name.clone(),
            base: e.base,
            size: e.size,
            node: e.node,
        });
        set.push(SetMember {
            media: Arc::clone(&d.media),
            base: e.base,
            len: e.size,
        });
    }
    let set = DeviceSet::new(set).map_err(|e| refuse(first, e.to_string()))?;
    Ok(Assembled {
        media: Arc::new(set),
        members,
    })
}
