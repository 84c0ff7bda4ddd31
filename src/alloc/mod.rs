//! PLACEHOLDER block allocator (naive first fit) so dependants compile while the real
//! allocator is being written; the allocator's author replaces this whole file.
use crate::device::{DeviceError, Media};
use crate::format::Geometry;
use crate::journal::{JournalError, Tx};
use parking_lot::Mutex;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    #[error("no space left on device")]
    NoSpace,
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("corrupted: {0}")]
    Corrupted(String),
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub start: u64,
    pub len: u64,
}
#[derive(Clone, Copy, Debug)]
pub struct AllocRequest {
    pub blocks: u64,
    pub min_blocks: u64,
    pub aligned: bool,
    pub goal: Option<u64>,
}
#[derive(Debug)]
pub struct BlockAllocator {
    free: Arc<Mutex<Vec<bool>>>,
    base: u64,
    g: Geometry,
}
impl BlockAllocator {
    pub fn open(media: &dyn Media, g: &Geometry) -> Result<Arc<Self>, AllocError> {
        let mut free = vec![false; g.block_count as usize];
        for b in 0..g.block_count {
            let w = media.load_u64(g.bitmap_offset() + b / 64 * 8)?;
            free[b as usize] = w & (1 << (b % 64)) == 0;
        }
        Ok(Arc::new(Self {
            free: Arc::new(Mutex::new(free)),
            base: g.bitmap_offset(),
            g: *g,
        }))
    }
    pub fn allocate(&self, tx: &mut Tx<'_>, r: AllocRequest) -> Result<BlockRange, AllocError> {
        let got = {
            let mut f = self.free.lock();
            let step = if r.aligned { 512 } else { 1 };
            let mut s = self.g.meta_end.next_multiple_of(step);
            let mut found = None;
            while s < self.g.block_count {
                let mut n = 0;
                while n < r.blocks && s + n < self.g.block_count && f[(s + n) as usize] {
                    n += 1;
                }
                if n >= r.min_blocks.max(1) && (!r.aligned || n % 512 == 0 || n >= r.blocks) {
                    found = Some(BlockRange { start: s, len: n });
                    break;
                }
                s += step;
            }
            let got = found.ok_or(AllocError::NoSpace)?;
            for b in got.start..got.start + got.len {
                f[b as usize] = false;
            }
            got
        };
        let fr = Arc::clone(&self.free);
        tx.on_abort(move || {
            let mut f = fr.lock();
            for b in got.start..got.start + got.len {
                f[b as usize] = true;
            }
        });
        tx.set_bits(self.base, got.start, got.len)?;
        Ok(got)
    }
    pub fn free(&self, tx: &mut Tx<'_>, r: BlockRange) -> Result<(), AllocError> {
        tx.clear_bits(self.base, r.start, r.len)?;
        let fr = Arc::clone(&self.free);
        tx.on_commit(move || {
            let mut f = fr.lock();
            for b in r.start..r.start + r.len {
                f[b as usize] = true;
            }
        });
        Ok(())
    }
    pub fn free_blocks(&self) -> u64 {
        self.free.lock().iter().filter(|&&x| x).count() as u64
    }
    pub fn data_blocks(&self) -> u64 {
        self.g.block_count - self.g.meta_end
    }
}
