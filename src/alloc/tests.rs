//! Unit tests of the allocator on a 64 MiB recording device (32 chunks; chunk 0 holds the
//! metadata and 252 free blocks, chunks 1..32 are whole and free).

use super::test_support::{TestFs, fresh};
use super::*;
use std::time::Instant;

const SIZE: u64 = 64 << 20;

fn fs() -> TestFs {
    fresh(SIZE).unwrap()
}

fn open(t: &TestFs, policy: AllocPolicy) -> Arc<BlockAllocator> {
    BlockAllocator::open_with_policy(t.dev.as_ref(), &t.geometry, policy).unwrap()
}

fn small(n: u64) -> AllocRequest {
    AllocRequest::exact(n)
}

fn chunks(k: u64) -> AllocRequest {
    AllocRequest {
        blocks: k * CHUNK_BLOCKS,
        min_blocks: CHUNK_BLOCKS,
        aligned: true,
        goal: None,
    }
}

fn alloc(a: &BlockAllocator, t: &TestFs, req: AllocRequest) -> Result<BlockRange, AllocError> {
    let mut tx = t.journal.begin();
    let r = a.allocate(&mut tx, req)?;
    tx.commit()?;
    Ok(r)
}

fn free(a: &BlockAllocator, t: &TestFs, r: BlockRange) {
    let mut tx = t.journal.begin();
    a.free(&mut tx, r).unwrap();
    tx.commit().unwrap();
}

fn check(a: &BlockAllocator, t: &TestFs) {
    a.check_against_bitmap(t.dev.as_ref()).unwrap();
}

fn overlaps(a: BlockRange, b: BlockRange) -> bool {
    a.start < b.end() && b.start < a.end()
}

/// Takes everything that is free, in a few large pieces, inside `tx`.
fn drain(a: &BlockAllocator, tx: &mut Tx<'_>) -> Vec<BlockRange> {
    let mut out = Vec::new();
    loop {
        let req = AllocRequest {
            blocks: 1 << 20,
            min_blocks: 1,
            aligned: false,
            goal: None,
        };
        match a.allocate(tx, req) {
            Ok(r) => out.push(r),
            Err(AllocError::NoSpace) => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn fresh_open_matches_the_bitmap() {
    let t = fs();
    let g = t.geometry;
    assert_eq!(g.block_count, 16384);
    assert!(g.meta_end < CHUNK_BLOCKS);
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let a = open(&t, policy);
        assert_eq!(a.free_blocks(), a.data_blocks());
        assert_eq!(a.data_blocks(), g.block_count - g.meta_end);
        assert_eq!(a.free_chunks(), 31);
        check(&a, &t);
    }
}

#[test]
fn small_requests_fill_small_space_before_splitting_a_chunk() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    let head = CHUNK_BLOCKS - t.geometry.meta_end;
    let mut got = Vec::new();
    // Chunk 0's free tail is small space from the start.
    let mut tx = t.journal.begin();
    for _ in 0..head / 4 {
        let r = a.allocate(&mut tx, small(4)).unwrap();
        assert!(
            r.start >= t.geometry.meta_end && r.end() <= CHUNK_BLOCKS,
            "{r:?}"
        );
        got.push(r);
    }
    if head % 4 > 0 {
        got.push(a.allocate(&mut tx, small(head % 4)).unwrap());
    }
    tx.commit().unwrap();
    assert_eq!(a.free_chunks(), 31);
    // No small space left: one chunk is split, the highest one.
    let r = alloc(&a, &t, small(1)).unwrap();
    assert_eq!(r.start, 31 * CHUNK_BLOCKS);
    assert_eq!(a.free_chunks(), 30);
    let r2 = alloc(&a, &t, small(7)).unwrap();
    assert_eq!(r2.start, r.end());
    check(&a, &t);
    // When all its blocks are free again the chunk goes back to the pool.
    free(&a, &t, r);
    assert_eq!(a.free_chunks(), 30);
    free(&a, &t, r2);
    assert_eq!(a.free_chunks(), 31);
    check(&a, &t);
    // Freed small blocks are reused before any chunk is split.
    free(&a, &t, got[3]);
    assert_eq!(alloc(&a, &t, small(4)).unwrap(), got[3]);
    assert_eq!(a.free_chunks(), 31);
    check(&a, &t);
}

#[test]
fn trailing_partial_chunk_is_small_space() {
    let size = SIZE + 300 * BLOCK_SIZE;
    let t = fresh(size).unwrap();
    let a = open(&t, AllocPolicy::HugeAware);
    assert_eq!(a.free_chunks(), 31);
    let small_space = (CHUNK_BLOCKS - t.geometry.meta_end) + 300;
    let mut tx = t.journal.begin();
    let mut n = 0;
    while n < small_space {
        let r = a.allocate(&mut tx, small(1)).unwrap();
        assert!(
            r.start < CHUNK_BLOCKS || r.start >= 32 * CHUNK_BLOCKS,
            "{r:?}"
        );
        n += 1;
    }
    tx.commit().unwrap();
    assert_eq!(a.free_chunks(), 31);
    alloc(&a, &t, small(1)).unwrap();
    assert_eq!(a.free_chunks(), 30);
    check(&a, &t);
}

#[test]
fn chunk_multiples_are_aligned_and_contiguous() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    alloc(&a, &t, small(3)).unwrap();
    let r = alloc(&a, &t, chunks(3)).unwrap();
    assert_eq!(r.start % CHUNK_BLOCKS, 0);
    assert_eq!(r.len, 3 * CHUNK_BLOCKS);
    // Small allocations split from the top, so large runs stay long at the bottom.
    let s = alloc(&a, &t, small(300)).unwrap();
    assert_eq!(s.start, 31 * CHUNK_BLOCKS);
    let r2 = alloc(&a, &t, chunks(20)).unwrap();
    assert_eq!((r2.start, r2.len), (r.end(), 20 * CHUNK_BLOCKS));
    // 7 whole chunks remain (4..=30 minus 20 taken = 7): a request of 10 gets the 7.
    let r3 = alloc(&a, &t, chunks(10)).unwrap();
    assert_eq!((r3.start % CHUNK_BLOCKS, r3.len), (0, 7 * CHUNK_BLOCKS));
    assert_eq!(a.free_chunks(), 0);
    check(&a, &t);
    // No whole chunk left: aligned requests fall back to the largest small runs, but only
    // when the caller accepts a short run.
    assert!(matches!(alloc(&a, &t, chunks(1)), Err(AllocError::NoSpace)));
    let fb = alloc(
        &a,
        &t,
        AllocRequest {
            min_blocks: 1,
            ..chunks(1)
        },
    )
    .unwrap();
    // The largest small run: chunk 0's tail (249 blocks) beats chunk 31's (212).
    assert_eq!(fb.len, CHUNK_BLOCKS - t.geometry.meta_end - 3);
    check(&a, &t);
}

#[test]
fn unaligned_large_request_needing_more_than_its_whole_chunks() {
    let t = fs();
    // One arena, so that the search order among small chunks is plain address order.
    let a =
        BlockAllocator::open_with_arenas(t.dev.as_ref(), &t.geometry, AllocPolicy::HugeAware, 1)
            .unwrap();
    let r = alloc(&a, &t, small(700)).unwrap();
    assert_eq!((r.start % CHUNK_BLOCKS, r.len), (0, 700));
    // The tail of the second chunk became small space.
    assert_eq!(a.free_chunks(), 29);
    let s = alloc(&a, &t, small(CHUNK_BLOCKS - t.geometry.meta_end)).unwrap();
    assert!(s.start < CHUNK_BLOCKS);
    let s2 = alloc(&a, &t, small(2 * CHUNK_BLOCKS - 700)).unwrap();
    assert_eq!(s2.start, r.end());
    check(&a, &t);
}

#[test]
fn no_space_when_full_and_space_comes_back_after_free() {
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let t = fs();
        let a = open(&t, policy);
        let mut tx = t.journal.begin();
        let all = drain(&a, &mut tx);
        tx.commit().unwrap();
        assert_eq!(all.iter().map(|r| r.len).sum::<u64>(), a.data_blocks());
        assert_eq!(a.free_blocks(), 0);
        assert!(matches!(alloc(&a, &t, small(1)), Err(AllocError::NoSpace)));
        assert!(matches!(alloc(&a, &t, chunks(1)), Err(AllocError::NoSpace)));
        check(&a, &t);
        let victim = BlockRange {
            start: all[0].start + 1,
            len: 5,
        };
        free(&a, &t, victim);
        assert_eq!(a.free_blocks(), 5);
        assert!(matches!(alloc(&a, &t, small(6)), Err(AllocError::NoSpace)));
        assert_eq!(alloc(&a, &t, small(5)).unwrap(), victim);
        check(&a, &t);
    }
}

#[test]
fn frees_are_not_reused_before_commit() {
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let t = fs();
        let a = open(&t, policy);
        let x = alloc(&a, &t, chunks(2)).unwrap();
        let y = alloc(&a, &t, small(10)).unwrap();
        let before = a.free_blocks();
        let mut tx_free = t.journal.begin();
        a.free(&mut tx_free, x).unwrap();
        a.free(&mut tx_free, y).unwrap();
        assert_eq!(a.free_blocks(), before, "not free until commit");
        // Another transaction takes everything it can: never the uncommitted frees.
        let mut tx = t.journal.begin_interleaved_for_test();
        let taken = drain(&a, &mut tx);
        assert!(taken.iter().all(|&r| !overlaps(r, x) && !overlaps(r, y)));
        drop(tx);
        tx_free.commit().unwrap();
        assert_eq!(a.free_blocks(), before + x.len + y.len);
        check(&a, &t);
        let mut tx = t.journal.begin();
        let taken = drain(&a, &mut tx);
        let covered = |b: u64| taken.iter().any(|r| r.start <= b && b < r.end());
        assert!((x.start..x.end()).all(covered) && (y.start..y.end()).all(covered));
        tx.commit().unwrap();
        check(&a, &t);
    }
}

#[test]
fn rolled_back_frees_keep_the_blocks_allocated() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    let x = alloc(&a, &t, small(10)).unwrap();
    let before = a.free_blocks();
    let mut tx = t.journal.begin();
    a.free(&mut tx, x).unwrap();
    drop(tx);
    assert_eq!(a.free_blocks(), before);
    check(&a, &t);
    free(&a, &t, x);
    check(&a, &t);
}

#[test]
fn rolled_back_allocations_return_to_the_index() {
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let t = fs();
        let a = open(&t, policy);
        let before = (a.free_blocks(), a.free_chunks());
        let mut tx = t.journal.begin();
        let r1 = a.allocate(&mut tx, chunks(4)).unwrap();
        let r2 = a.allocate(&mut tx, small(17)).unwrap();
        assert!(!overlaps(r1, r2));
        // Freeing in the same transaction what it allocated, then rolling back.
        a.free(&mut tx, r2).unwrap();
        drop(tx);
        assert_eq!((a.free_blocks(), a.free_chunks()), before);
        check(&a, &t);
        // The same, committed: the freed part is free, the rest allocated.
        let mut tx = t.journal.begin();
        let r1 = a.allocate(&mut tx, chunks(1)).unwrap();
        let r2 = a.allocate(&mut tx, small(17)).unwrap();
        a.free(&mut tx, r2).unwrap();
        tx.commit().unwrap();
        assert_eq!(a.free_blocks(), before.0 - r1.len);
        check(&a, &t);
    }
}

#[test]
fn bad_frees_are_refused() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    let g = t.geometry;
    let x = alloc(&a, &t, small(8)).unwrap();
    let mut tx = t.journal.begin();
    let bad = [
        BlockRange { start: 0, len: 1 },
        BlockRange {
            start: g.meta_end - 1,
            len: 2,
        },
        BlockRange {
            start: g.block_count - 1,
            len: 2,
        },
        BlockRange {
            start: u64::MAX - 1,
            len: 4,
        },
        BlockRange {
            start: x.start,
            len: 0,
        },
        // Partly free.
        BlockRange {
            start: x.start,
            len: x.len + 1,
        },
        // Entirely free.
        BlockRange {
            start: 20 * CHUNK_BLOCKS,
            len: 3,
        },
    ];
    for r in bad {
        assert!(
            matches!(a.free(&mut tx, r), Err(AllocError::Corrupted(_))),
            "{r:?}"
        );
    }
    assert!(tx.is_empty(), "a refused free logs nothing");
    assert!(matches!(
        a.allocate(&mut tx, small(0)),
        Err(AllocError::Corrupted(_))
    ));
    drop(tx);
    // Double free: the second one is refused.
    free(&a, &t, x);
    let mut tx = t.journal.begin();
    assert!(matches!(a.free(&mut tx, x), Err(AllocError::Corrupted(_))));
    drop(tx);
    check(&a, &t);
}

#[test]
fn goal_extends_files_in_place() {
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let t = fs();
        let a = open(&t, policy);
        let r1 = alloc(&a, &t, small(10)).unwrap();
        let r2 = alloc(&a, &t, small(10)).unwrap();
        assert_eq!(r2.start, r1.end());
        free(&a, &t, r1);
        // Without a goal the hole is filled; with one the file after r2 grows in place.
        let g = alloc(
            &a,
            &t,
            AllocRequest {
                goal: Some(r2.end() - 1),
                ..small(5)
            },
        )
        .unwrap();
        assert_eq!(g.start, r2.end(), "{policy:?}");
        assert_eq!(alloc(&a, &t, small(5)).unwrap().start, r1.start);
        // A goal whose next blocks are taken falls back to the normal policy.
        let h = alloc(
            &a,
            &t,
            AllocRequest {
                goal: Some(r1.start - 1 + 5 - 1),
                ..small(3)
            },
        )
        .unwrap();
        assert_eq!(h.start, r1.start + 5);
        check(&a, &t);
    }
}

#[test]
fn goal_with_whole_chunks() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    let c1 = alloc(&a, &t, chunks(1)).unwrap();
    let c2 = alloc(&a, &t, chunks(1)).unwrap();
    assert_eq!(c2.start, c1.end());
    free(&a, &t, c1);
    let c3 = alloc(
        &a,
        &t,
        AllocRequest {
            goal: Some(c2.end() - 1),
            ..chunks(2)
        },
    )
    .unwrap();
    assert_eq!((c3.start, c3.len), (c2.end(), 2 * CHUNK_BLOCKS));
    assert_eq!(alloc(&a, &t, chunks(1)).unwrap().start, c1.start);
    // An unaligned file growing from small space: up to its chunk's end, and never a
    // partial split of the whole chunk after it.
    let s = alloc(&a, &t, small(100)).unwrap();
    assert!(s.end() < CHUNK_BLOCKS);
    let g = alloc(
        &a,
        &t,
        AllocRequest {
            blocks: 600,
            min_blocks: 1,
            aligned: false,
            goal: Some(s.end() - 1),
        },
    )
    .unwrap();
    assert_eq!((g.start, g.len), (s.end(), CHUNK_BLOCKS - s.end()));
    // A large unaligned growth takes the whole free chunks that follow.
    let big = alloc(&a, &t, chunks(1)).unwrap();
    let tail = BlockRange {
        start: big.start + 500,
        len: 12,
    };
    free(&a, &t, tail);
    let g = alloc(
        &a,
        &t,
        AllocRequest {
            blocks: 12 + 2 * CHUNK_BLOCKS + 7,
            min_blocks: 1,
            aligned: false,
            goal: Some(tail.start - 1),
        },
    )
    .unwrap();
    assert_eq!((g.start, g.len), (tail.start, 12 + 2 * CHUNK_BLOCKS));
    check(&a, &t);
}

#[test]
fn partial_frees_of_a_huge_extent_make_it_small_space() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    let fill = CHUNK_BLOCKS - t.geometry.meta_end;
    alloc(&a, &t, small(fill)).unwrap();
    let x = alloc(&a, &t, chunks(1)).unwrap();
    let chunks_before = a.free_chunks();
    free(
        &a,
        &t,
        BlockRange {
            start: x.start + 20,
            len: 30,
        },
    );
    assert_eq!(a.free_chunks(), chunks_before);
    // The hole is small space now: used before any chunk is split.
    let s = alloc(&a, &t, small(30)).unwrap();
    assert_eq!(s.start, x.start + 20);
    assert_eq!(a.free_chunks(), chunks_before);
    // Freeing the chunk piece by piece returns it to the pool once whole.
    free(
        &a,
        &t,
        BlockRange {
            start: x.start,
            len: 50,
        },
    );
    free(
        &a,
        &t,
        BlockRange {
            start: x.start + 50,
            len: CHUNK_BLOCKS - 50,
        },
    );
    assert_eq!(a.free_chunks(), chunks_before + 1);
    check(&a, &t);
}

#[test]
fn first_fit_ignores_alignment() {
    let t = fs();
    let a = open(&t, AllocPolicy::FirstFit);
    let s = alloc(&a, &t, small(1)).unwrap();
    assert_eq!(s.start, t.geometry.meta_end);
    let r = alloc(&a, &t, chunks(1)).unwrap();
    assert_eq!((r.start, r.len), (s.end(), CHUNK_BLOCKS));
    assert_eq!(a.free_chunks(), 30);
    check(&a, &t);
}

#[test]
fn reopening_rebuilds_the_same_index() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    let mut kept = Vec::new();
    for i in 0..40u64 {
        let r = alloc(&a, &t, if i % 5 == 0 { chunks(1) } else { small(i + 1) }).unwrap();
        if i % 3 == 0 {
            free(&a, &t, r);
        } else {
            kept.push(r);
        }
    }
    check(&a, &t);
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let b = BlockAllocator::open_with_arenas(t.dev.as_ref(), &t.geometry, policy, 3).unwrap();
        assert_eq!(b.free_blocks(), a.free_blocks());
        assert_eq!(b.free_chunks(), a.free_chunks());
        check(&b, &t);
    }
}

#[test]
fn check_reports_a_bitmap_that_differs() {
    let t = fs();
    let a = open(&t, AllocPolicy::HugeAware);
    let x = alloc(&a, &t, small(3)).unwrap();
    let off = t.geometry.bitmap_offset() + x.start / 64 * 8;
    let w = t.dev.load_u64(off).unwrap();
    t.dev.store_u64(off, w & !(1 << (x.start % 64))).unwrap();
    let e = a.check_against_bitmap(t.dev.as_ref()).unwrap_err();
    assert!(e.contains(&format!("block {}", x.start)), "{e}");
}

/// A 64 GiB device that stores nothing but its bitmap: for timing `open`.
#[derive(Debug)]
struct BitmapOnly {
    size: u64,
    bitmap_offset: u64,
    bitmap: Vec<u8>,
}

impl Media for BitmapOnly {
    fn size(&self) -> u64 {
        self.size
    }
    fn persistence(&self) -> crate::device::PersistenceMode {
        crate::device::PersistenceMode::Recorded
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let rel = offset - self.bitmap_offset;
        buf.copy_from_slice(&self.bitmap[rel as usize..rel as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }
    fn write_nt(&self, _: u64, _: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }
    fn zero_nt(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }
    fn flush(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn fence(&self) {}
    fn load_u64(&self, offset: u64) -> Result<u64, DeviceError> {
        let mut w = [0; 8];
        self.read(offset, &mut w)?;
        Ok(u64::from_le_bytes(w))
    }
    fn store_u64(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }
    fn fetch_or_u64(&self, _: u64, _: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::ReadOnly)
    }
    fn fetch_and_u64(&self, _: u64, _: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::ReadOnly)
    }
    fn sync_all(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reserve(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn can_discard(&self) -> bool {
        false
    }
    fn discard(&self, _: u64, _: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::NoDiscard)
    }
}

#[test]
fn open_of_a_64_gib_bitmap_is_fast() {
    let size = 64u64 << 30;
    // Without a space summary (a version-2 image): the whole bitmap is read, the worst case.
    let g = Geometry::layout(size, false).unwrap();
    let words = g.bitmap_blocks * BLOCK_SIZE / 8;
    // An aged-looking bitmap: a third of the chunks full, a third empty, a third mixed.
    let mut bitmap = Vec::with_capacity((words * 8) as usize);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for wi in 0..words {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let w = match (wi / 8) % 3 {
            0 => u64::MAX,
            1 => 0,
            _ => seed,
        } | !huge::valid_mask(wi, g.meta_end, g.block_count);
        bitmap.extend_from_slice(&w.to_le_bytes());
    }
    let media = BitmapOnly {
        size,
        bitmap_offset: g.bitmap_offset(),
        bitmap,
    };
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let t0 = Instant::now();
        let a = BlockAllocator::open_with_policy(&media, &g, policy).unwrap();
        let took = t0.elapsed();
        eprintln!(
            "open {policy:?} of 64 GiB ({} KiB of bitmap): {took:?}",
            words / 128
        );
        assert!(took.as_millis() < 1000, "{took:?}");
        assert!(a.free_chunks() >= g.chunk_count() / 3 - 1);
        a.check_against_bitmap(&media).unwrap();
    }
}

/// A small aging run: files of mixed sizes created and deleted at ~80% full. The huge-aware
/// policy must keep more whole free chunks, and more of the large files' blocks in aligned
/// chunks, than first fit.
#[test]
fn aging_keeps_whole_chunks_free() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let size = 256u64 << 20;
    let mut results = Vec::new();
    for policy in [AllocPolicy::HugeAware, AllocPolicy::FirstFit] {
        let t = fresh(size).unwrap();
        let a = open(&t, policy);
        let mut rng = StdRng::seed_from_u64(7);
        let mut files: Vec<(bool, Vec<BlockRange>)> = Vec::new();
        let target = a.data_blocks() * 8 / 10;
        for round in 0..3000 {
            let used = a.data_blocks() - a.free_blocks();
            if used > target || (round % 3 == 0 && !files.is_empty()) {
                let (_, ranges) = files.swap_remove(rng.random_range(0..files.len()));
                let mut tx = t.journal.begin();
                for r in ranges {
                    a.free(&mut tx, r).unwrap();
                }
                tx.commit().unwrap();
                continue;
            }
            let large = rng.random_bool(0.3);
            let mut want = if large {
                rng.random_range(1..5) * CHUNK_BLOCKS
            } else {
                rng.random_range(1..64)
            };
            let mut ranges: Vec<BlockRange> = Vec::new();
            let mut tx = t.journal.begin();
            while want > 0 {
                let req = AllocRequest {
                    blocks: want,
                    min_blocks: 1,
                    aligned: large,
                    goal: ranges.last().map(|r| r.end() - 1),
                };
                match a.allocate(&mut tx, req) {
                    Ok(r) => {
                        want -= r.len;
                        ranges.push(r);
                    }
                    Err(AllocError::NoSpace) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            tx.commit().unwrap();
            files.push((large, ranges));
        }
        check(&a, &t);
        let (mut aligned, mut total) = (0u64, 0u64);
        for (_, ranges) in files.iter().filter(|(l, _)| *l) {
            for r in ranges {
                total += r.len;
                let first = r.start.next_multiple_of(CHUNK_BLOCKS);
                if first < r.end() {
                    aligned += (r.end() - first) / CHUNK_BLOCKS * CHUNK_BLOCKS;
                }
            }
        }
        let share = aligned as f64 / total.max(1) as f64;
        eprintln!(
            "{policy:?}: {} free blocks, {} whole free chunks, large-file share in aligned chunks {:.1}%",
            a.free_blocks(),
            a.free_chunks(),
            share * 100.0
        );
        results.push((a.free_chunks(), share));
    }
    assert!(results[0].0 > results[1].0, "{results:?}");
    assert!(results[0].1 >= results[1].1, "{results:?}");
    assert!(results[0].1 > 0.95, "{results:?}");
}

/// The index of a fresh device of `regions` GiB whose first `meta_end` blocks are metadata:
/// region 0 is broken by them, the others are whole.
fn region_index(regions: u64, meta_end: u64) -> huge::HugeIndex {
    let block_count = regions * REGION_BLOCKS;
    let words = block_count.div_ceil(64);
    let persistent: Vec<u64> = (0..words)
        .map(|wi| !huge::valid_mask(wi, meta_end, block_count))
        .collect();
    huge::HugeIndex::build(&persistent, block_count, meta_end, 4)
}

#[test]
fn small_and_medium_requests_keep_whole_regions_whole() {
    let index = region_index(3, 1536);
    assert_eq!(index.free_regions(), 2);
    let mut taken = Vec::new();
    // About 800 MiB of 8 MiB extents and small files: region 0 can hold all of it.
    for i in 0..100u64 {
        let n = 1 + i % 37;
        taken.push(index.take(n, n, false, None, None).unwrap());
        taken.push(
            index
                .take(4 * CHUNK_BLOCKS, CHUNK_BLOCKS, true, None, None)
                .unwrap(),
        );
    }
    assert!(
        taken.iter().all(|r| r.end() <= REGION_BLOCKS),
        "an allocation left region 0 while it had room"
    );
    assert_eq!(index.free_regions(), 2);
    index.snapshot().unwrap();
    // Region 0 full: the next small request breaks the highest whole region, not both.
    let rest = region_index(3, 1536);
    while let Some(r) = rest.take(CHUNK_BLOCKS, 1, true, None, None) {
        if r.end() > REGION_BLOCKS {
            rest.release(r);
            break;
        }
    }
    let r = rest.take(8, 8, false, None, None).unwrap();
    assert!(r.start >= 2 * REGION_BLOCKS, "{r:?}");
    assert_eq!(rest.free_regions(), 1);
    rest.snapshot().unwrap();
}

#[test]
fn whole_regions_are_taken_aligned_and_come_back_whole() {
    let index = region_index(4, 1536);
    assert_eq!(index.free_regions(), 3);
    let r = index.take_regions(2).unwrap();
    assert_eq!(
        r,
        BlockRange {
            start: REGION_BLOCKS,
            len: 2 * REGION_BLOCKS
        }
    );
    let last = index.take_regions(5).unwrap();
    assert_eq!(
        last,
        BlockRange {
            start: 3 * REGION_BLOCKS,
            len: REGION_BLOCKS
        }
    );
    assert_eq!(index.take_regions(1), None);
    index.snapshot().unwrap();
    // Freed in pieces, a region is whole again once its last chunk is back.
    index.release(BlockRange {
        start: REGION_BLOCKS,
        len: REGION_BLOCKS - 8,
    });
    assert_eq!(index.free_regions(), 0);
    index.release(BlockRange {
        start: 2 * REGION_BLOCKS - 8,
        len: 8,
    });
    assert_eq!(index.free_regions(), 1);
    index.snapshot().unwrap();
    assert_eq!(index.take_regions(1).map(|r| r.start), Some(REGION_BLOCKS));
}

#[test]
fn first_fit_has_no_regions() {
    let t = fs();
    let a = open(&t, AllocPolicy::FirstFit);
    assert_eq!(a.free_regions(), 0);
    let mut tx = t.journal.begin();
    assert!(matches!(
        a.allocate_regions(&mut tx, REGION_BLOCKS),
        Err(AllocError::NoSpace)
    ));
}

/// A fresh test file system of `gib` GiB: region 0 holds the metadata, the others start
/// uninitialised (their bitmap words hold garbage).
fn lazy_fs(gib: u64) -> TestFs {
    let t = fresh(gib * REGION_SIZE).unwrap();
    assert_eq!(t.geometry.region_count(), gib);
    t
}

fn summary_of(t: &TestFs) -> SpaceSummary {
    SpaceSummary::read(t.dev.as_ref(), &t.geometry)
        .unwrap()
        .unwrap()
}

#[test]
fn an_uninitialised_region_is_written_before_its_first_block_is_handed_out() {
    let t = lazy_fs(3);
    let a = open(&t, AllocPolicy::HugeAware);
    assert!(!a.region_is_uninit(0) && a.region_is_uninit(1) && a.region_is_uninit(2));
    assert_eq!(a.free_blocks(), a.data_blocks());
    assert_eq!(a.free_regions(), 2);
    check(&a, &t);
    // Small and medium requests are served by the broken region 0 and touch no other.
    let small_one = alloc(&a, &t, small(3)).unwrap();
    let medium = alloc(&a, &t, chunks(4)).unwrap();
    assert!(medium.end() <= REGION_BLOCKS && small_one.end() <= REGION_BLOCKS);
    assert!(a.region_is_uninit(1) && a.region_is_uninit(2));
    // A whole region: the first uninitialised one is initialised, the other stays.
    let region = alloc_region(&a, &t);
    assert_eq!(region.start, REGION_BLOCKS);
    assert!(!a.region_is_uninit(1) && a.region_is_uninit(2));
    let s = summary_of(&t);
    assert!(!s.is_uninit(1) && s.is_uninit(2));
    assert!(!s.counts_valid, "a change marks the counts stale");
    check(&a, &t);
    // A free in a region that was never initialised is refused, and changes nothing.
    let mut tx = t.journal.begin();
    let bogus = BlockRange {
        start: 2 * REGION_BLOCKS + 8,
        len: 1,
    };
    assert!(matches!(
        a.free(&mut tx, bogus),
        Err(AllocError::Corrupted(_))
    ));
    tx.commit().unwrap();
    free(&a, &t, region);
    free(&a, &t, medium);
    check(&a, &t);
    assert_eq!(a.free_regions(), 2);
}

fn alloc_region(a: &BlockAllocator, t: &TestFs) -> BlockRange {
    let mut tx = t.journal.begin();
    let r = a.allocate_regions(&mut tx, REGION_BLOCKS).unwrap();
    tx.commit().unwrap();
    r
}

#[test]
fn exact_counts_let_open_skip_the_bitmap_of_whole_regions() {
    let t = lazy_fs(3);
    let a = open(&t, AllocPolicy::HugeAware);
    let region = alloc_region(&a, &t);
    let part = BlockRange {
        start: region.start + 10 * CHUNK_BLOCKS,
        len: 3 * CHUNK_BLOCKS + 5,
    };
    free(&a, &t, part);
    a.write_summary(t.dev.as_ref()).unwrap();
    let s = summary_of(&t);
    assert!(s.counts_valid);
    assert_eq!(u64::from(s.regions[1].free), part.len);
    assert_eq!(u64::from(s.regions[2].free), REGION_BLOCKS);
    // Region 1 (partly used) is loaded from its bitmap; region 2 enters the pool whole.
    let b = open(&t, AllocPolicy::HugeAware);
    assert_eq!(b.free_blocks(), a.free_blocks());
    assert_eq!(b.free_regions(), 1);
    check(&b, &t);
    // With the counts claiming region 1 entirely used, open does not read its bitmap: the
    // (stale) counts are what it trusts, which is why a mount marks them stale first.
    let used = RegionEntry {
        uninit: false,
        free: 0,
    };
    t.dev
        .store_u64(space::entry_offset(&t.geometry, 1), used.encode())
        .unwrap();
    let c = open(&t, AllocPolicy::HugeAware);
    assert_eq!(c.free_blocks(), a.free_blocks() - part.len);
    // The first change marks them stale: the next open reads the bitmap again.
    let one = alloc(&c, &t, small(1)).unwrap();
    assert!(!summary_of(&t).counts_valid);
    free(&c, &t, one);
    let d = open(&t, AllocPolicy::HugeAware);
    assert_eq!(d.free_blocks(), a.free_blocks());
    check(&d, &t);
}

#[test]
fn hostile_summary_values_are_refused_at_open() {
    let t = lazy_fs(2);
    let g = t.geometry;
    // Region 0 holds the metadata: it can never be uninitialised.
    let entry0 = space::entry_offset(&g, 0);
    let good = t.dev.load_u64(entry0).unwrap();
    for bad in [
        RegionEntry::fresh_uninit().encode(),
        u64::MAX,
        REGION_BLOCKS + 1,
    ] {
        t.dev.store_u64(entry0, bad).unwrap();
        let e = BlockAllocator::open(t.dev.as_ref(), &g).unwrap_err();
        assert!(e.to_string().contains("region 0"), "{e}");
    }
    t.dev.store_u64(entry0, good).unwrap();
    t.dev.store_u64(g.summary_offset(), 7).unwrap();
    let e = BlockAllocator::open(t.dev.as_ref(), &g).unwrap_err();
    assert!(e.to_string().contains("bad magic"), "{e}");
}

#[test]
fn used_chunk_runs_skip_the_bitmap_of_regions_nobody_used() {
    let t = lazy_fs(3);
    let a = open(&t, AllocPolicy::HugeAware);
    let from = t.geometry.meta_end / CHUNK_BLOCKS;
    assert_eq!(a.used_chunk_runs(), vec![from..from + 1]);
    let region = alloc_region(&a, &t);
    let first = region.start / CHUNK_BLOCKS;
    assert_eq!(
        a.used_chunk_runs(),
        vec![from..from + 1, first..first + REGION_CHUNKS]
    );
}

/// A power failure at every fence while a region is first initialised and used, and while
/// part of it is freed: every crash image recovers to an allocator that equals its bitmap
/// (so no garbage word of the uninitialised bitmap is ever taken as truth), with region 1
/// either untouched (flagged or zeroed), entirely allocated, or allocated but the freed part.
#[test]
fn crash_at_every_fence_of_a_lazy_initialisation() {
    let t = lazy_fs(2);
    let g = t.geometry;
    let a = open(&t, AllocPolicy::HugeAware);
    let all_free = a.free_blocks();
    t.dev.start_recording();
    let region = alloc_region(&a, &t);
    assert_eq!(region.start, REGION_BLOCKS);
    let part = BlockRange {
        start: region.start + 7 * CHUNK_BLOCKS,
        len: 2 * CHUNK_BLOCKS + 3,
    };
    free(&a, &t, part);
    t.dev.stop_recording();
    let fences = t.dev.fence_count();
    assert!(fences >= 8, "{fences} fences");
    let allowed = [
        all_free,
        all_free - REGION_BLOCKS,
        all_free - REGION_BLOCKS + part.len,
    ];
    let mut seen = std::collections::BTreeSet::new();
    let mut images = 0;
    for f in 0..=fences {
        let lines = t.dev.crash_lines(f);
        let n = lines.pending.len();
        let masks: Vec<u64> = if n <= 6 {
            (0..1u64 << n).collect()
        } else {
            vec![0, u64::MAX, 0x5555_5555_5555_5555, 0xaaaa_aaaa_aaaa_aaaa]
        };
        for mask in masks {
            let media: Arc<dyn Media> = Arc::new(lines.media(|i| mask >> (i % 64) & 1 == 1));
            crate::journal::Journal::open(Arc::clone(&media), g).unwrap();
            let b = BlockAllocator::open(media.as_ref(), &g).unwrap();
            b.check_against_bitmap(media.as_ref())
                .unwrap_or_else(|e| panic!("fence {f}, mask {mask:#x}: {e}"));
            let free = b.free_blocks();
            assert!(allowed.contains(&free), "fence {f}: {free} free");
            if b.region_is_uninit(1) {
                assert_eq!(free, all_free, "fence {f}: flagged but not all free");
            }
            seen.insert((free, b.region_is_uninit(1)));
            images += 1;
        }
    }
    // Every state was reached: flagged, zeroed, allocated, partly freed.
    assert_eq!(seen.len(), 4, "{seen:?} over {images} images");
}

/// Extends the run ending at block `end` by one chunk in place, as a growing file does.
fn extend_in_place(index: &huge::HugeIndex, end: u64) -> Option<BlockRange> {
    index
        .take(CHUNK_BLOCKS, CHUNK_BLOCKS, true, Some(end - 1), None)
        .filter(|r| r.start == end)
}

#[test]
fn a_growing_file_fills_its_region_in_place_while_others_allocate() {
    let index = region_index(3, 1536);
    let start = index.take_stream_start(16).unwrap();
    assert_eq!(
        start,
        BlockRange {
            start: REGION_BLOCKS,
            len: 16 * CHUNK_BLOCKS
        }
    );
    let mut end = start.end();
    let mut others = Vec::new();
    // Between two chunks of the growing file, other files take small blocks and 2 MiB
    // chunks: they go to region 0, not right after the growing file, nor into region 2.
    while end < 2 * REGION_BLOCKS {
        let got = extend_in_place(&index, end);
        assert!(got.is_some(), "chunk at {end} taken by another request");
        end += CHUNK_BLOCKS;
        if others.len() < 300 {
            let n = 1 + others.len() as u64 % 37;
            others.push(index.take(n, n, false, None, None).unwrap());
            others.push(
                index
                    .take(CHUNK_BLOCKS, CHUNK_BLOCKS, true, None, None)
                    .unwrap(),
            );
        }
    }
    assert!(
        others.iter().all(|r| r.end() <= REGION_BLOCKS),
        "another request went into the growing file's region or the whole one"
    );
    assert_eq!(index.free_regions(), 1);
    index.snapshot().unwrap();
}

#[test]
fn extending_in_place_does_not_enter_a_whole_region() {
    let index = region_index(3, 1536);
    // A run ending at region 1's start: its chunks are whole, so the next one is refused
    // in place (the caller takes a chunk elsewhere).
    assert_eq!(extend_in_place(&index, REGION_BLOCKS), None);
    assert_eq!(index.free_regions(), 2);
    index.snapshot().unwrap();
}

#[test]
fn reserved_regions_are_used_last_and_taken_first_for_1_gib_extents() {
    let index = region_index(4, 1536);
    index.reserve_regions(2);
    assert_eq!(index.reserved_regions(), 2);
    // Requests for whole regions and growing files start in the reserved ones.
    let r = index.take_regions(1).unwrap();
    assert_eq!(r.start, 2 * REGION_BLOCKS);
    let s = index.take_stream_start(1).unwrap();
    assert_eq!(s.start, 3 * REGION_BLOCKS);
    index.release(r);
    index.release(s);
    assert_eq!(index.free_regions(), 3);
    // Everything else fills regions 0 and 1 (breaking region 1) before it touches 2 or 3.
    let reserved_start = 2 * REGION_BLOCKS;
    let mut i = 0u64;
    loop {
        i += 1;
        let (n, aligned) = if i % 2 == 0 {
            (1 + i % 37, false)
        } else {
            (4 * CHUNK_BLOCKS, true)
        };
        let free = index.snapshot().unwrap();
        let longest_unreserved = bits::longest_run(&free, 0, reserved_start);
        let r = index
            .take(n, 1, aligned, None, None)
            .expect("a full unreserved part spills into the reserved regions");
        if r.end() > reserved_start {
            assert!(
                longest_unreserved == 0,
                "took {r:?} in a reserved region while the rest had a free run of \
                 {longest_unreserved} blocks"
            );
            break;
        }
    }
    index.snapshot().unwrap();
}
