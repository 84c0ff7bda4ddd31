//! pmfs: a file system for persistent memory, served through FUSE.
//!
//! The modules are the layers, bottom up (docs/ARCHITECTURE.md draws them):
//! - [`device`]: the mapped device, the only module allowed raw memory access; a recording
//!   twin for tests.
//! - [`format`]: the on-media structures, validated on every read.
//! - [`journal`]: undo-logged transactions ([`journal::Tx`] is the only way to change
//!   metadata).
//! - [`alloc`]: the block allocator with its 2 MiB-aware policy.
//! - [`meta`]: the metadata objects (superblocks, state record, inode table, directories,
//!   extent maps, xattr areas) that the core, the checker and the repair share.
//! - [`lockorder`]: the global lock order and its debug-build check.
//! - [`mkfs`]: formatting a device.

pub mod alloc;
pub mod btree;
pub mod check;
pub mod cli;
pub mod device;
pub mod error;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod journal;
pub mod lockorder;
pub mod meta;
pub mod mkfs;
pub mod repair;

/// Direct (DAX-style) mapping of pmfs files for applications.
pub use device::dax;
