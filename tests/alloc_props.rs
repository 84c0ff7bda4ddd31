//! Property and concurrency tests of the block allocator on a 64 MiB recording device.
//!
//! A model keeps every block the test owns (allocated and committed, allocated in the open
//! transaction, or freed by a transaction that has not committed yet). Every allocation must
//! return blocks the model does not own: no block is ever handed out twice, and uncommitted
//! frees are never reused. After every transaction the in-memory index must equal the
//! persistent bitmap and the free count must equal what the model leaves free.

use pmfs::alloc::test_support::{TestFs, fresh};
use pmfs::alloc::{AllocError, AllocPolicy, AllocRequest, BlockAllocator, BlockRange};
use pmfs::format::CHUNK_BLOCKS;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const SIZE: u64 = 64 << 20;

#[derive(Clone, Debug)]
enum Op {
    /// Allocate: size class, aligned, extend the last allocation (goal), accept short runs.
    Alloc {
        size: u64,
        chunks: bool,
        goal: bool,
        short: bool,
    },
    /// Free part of a live range: which one, and which part (0 all, 1 front, 2 back).
    Free { pick: usize, part: u8 },
    /// Free something that is not allocated (must be refused and change nothing).
    BadFree { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u64..300, any::<bool>(), any::<bool>()).prop_map(|(size, goal, short)| Op::Alloc {
            size,
            chunks: false,
            goal,
            short
        }),
        2 => (1u64..6, any::<bool>(), any::<bool>()).prop_map(|(size, goal, short)| Op::Alloc {
            size,
            chunks: true,
            goal,
            short
        }),
        4 => (any::<usize>(), 0u8..3).prop_map(|(pick, part)| Op::Free { pick, part }),
        1 => any::<usize>().prop_map(|pick| Op::BadFree { pick }),
    ]
}

fn txs() -> impl Strategy<Value = Vec<(Vec<Op>, bool)>> {
    prop::collection::vec(
        (
            prop::collection::vec(op(), 1..8),
            prop::bool::weighted(0.75),
        ),
        1..24,
    )
}

struct Model {
    owned: Vec<bool>,
    live: Vec<BlockRange>,
}

impl Model {
    fn count(&self) -> u64 {
        self.owned.iter().filter(|&&b| b).count() as u64
    }
    fn mark(&mut self, r: BlockRange, v: bool) {
        for b in r.start..r.end() {
            self.owned[b as usize] = v;
        }
    }
}

#[cfg(test)] // (clippy: unwrap is fine in test helpers)
fn run_sequence(policy: AllocPolicy, seq: &[(Vec<Op>, bool)]) -> Result<(), TestCaseError> {
    let t: TestFs = fresh(SIZE).unwrap();
    let g = t.geometry;
    let a = BlockAllocator::open_with_policy(t.dev.as_ref(), &g, policy).unwrap();
    let mut m = Model {
        owned: vec![false; g.block_count as usize],
        live: Vec::new(),
    };
    for b in 0..g.meta_end {
        m.owned[b as usize] = true;
    }
    for (ops, commit) in seq {
        let mut tx = t.journal.begin();
        let mut allocated: Vec<BlockRange> = Vec::new();
        let mut freed: Vec<BlockRange> = Vec::new();
        let live_before = m.live.clone();
        for op in ops {
            match *op {
                Op::Alloc {
                    size,
                    chunks,
                    goal,
                    short,
                } => {
                    let blocks = if chunks { size * CHUNK_BLOCKS } else { size };
                    let min = if short {
                        1
                    } else if chunks {
                        CHUNK_BLOCKS
                    } else {
                        blocks
                    };
                    let req = AllocRequest {
                        blocks,
                        min_blocks: min,
                        aligned: chunks,
                        goal: goal.then(|| m.live.last().map(|r| r.end() - 1)).flatten(),
                    };
                    let whole_chunks_left = a.free_chunks() > 0;
                    match a.allocate(&mut tx, req) {
                        Ok(r) => {
                            prop_assert!(r.len >= min && r.len <= blocks, "{req:?} -> {r:?}");
                            prop_assert!(r.end() <= g.block_count);
                            for b in r.start..r.end() {
                                prop_assert!(!m.owned[b as usize], "block {b} handed out twice");
                            }
                            if policy == AllocPolicy::HugeAware && chunks && whole_chunks_left {
                                prop_assert!(
                                    r.start % CHUNK_BLOCKS == 0 && r.len % CHUNK_BLOCKS == 0,
                                    "{req:?} -> {r:?} with whole chunks left"
                                );
                            }
                            m.mark(r, true);
                            m.live.push(r);
                            allocated.push(r);
                        }
                        Err(AllocError::NoSpace) => {
                            if min == 1 {
                                prop_assert_eq!(a.free_blocks(), 0);
                            }
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                    }
                }
                Op::Free { pick, part } => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let i = pick % m.live.len();
                    let r = m.live[i];
                    let (gone, keep) = match part {
                        1 if r.len > 1 => {
                            let h = r.len / 2;
                            (
                                BlockRange {
                                    start: r.start,
                                    len: h,
                                },
                                Some(BlockRange {
                                    start: r.start + h,
                                    len: r.len - h,
                                }),
                            )
                        }
                        2 if r.len > 1 => {
                            let h = r.len / 2;
                            (
                                BlockRange {
                                    start: r.start + h,
                                    len: r.len - h,
                                },
                                Some(BlockRange {
                                    start: r.start,
                                    len: h,
                                }),
                            )
                        }
                        _ => (r, None),
                    };
                    a.free(&mut tx, gone)
                        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                    match keep {
                        Some(k) => m.live[i] = k,
                        None => {
                            m.live.remove(i);
                        }
                    }
                    freed.push(gone);
                }
                Op::BadFree { pick } => {
                    // A free block: one the model does not own.
                    let free: Vec<u64> = (g.meta_end..g.block_count)
                        .filter(|&b| !m.owned[b as usize])
                        .collect();
                    if free.is_empty() {
                        continue;
                    }
                    let b = free[pick % free.len()];
                    let r = BlockRange { start: b, len: 1 };
                    prop_assert!(matches!(a.free(&mut tx, r), Err(AllocError::Corrupted(_))));
                }
            }
        }
        if *commit {
            tx.commit().unwrap();
            for r in freed {
                m.mark(r, false);
            }
        } else {
            drop(tx);
            for r in allocated {
                m.mark(r, false);
            }
            m.live = live_before;
            // Ranges allocated and freed in the same transaction are not owned either way;
            // frees of older ranges are undone: those are owned again.
            for r in &m.live {
                for b in r.start..r.end() {
                    m.owned[b as usize] = true;
                }
            }
        }
        a.check_against_bitmap(t.dev.as_ref())
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(a.free_blocks(), g.block_count - m.count());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn huge_aware_random_sequences(seq in txs()) {
        run_sequence(AllocPolicy::HugeAware, &seq)?;
    }

    #[test]
    fn first_fit_random_sequences(seq in txs()) {
        run_sequence(AllocPolicy::FirstFit, &seq)?;
    }
}

/// Four threads allocate and free in transactions, some rolled back; a shared map of owned
/// blocks catches any block handed out twice.
#[cfg(test)]
fn concurrent(policy: AllocPolicy, arenas: usize) {
    let t = Arc::new(fresh(SIZE).unwrap());
    let g = t.geometry;
    let a = BlockAllocator::open_with_arenas(t.dev.as_ref(), &g, policy, arenas).unwrap();
    let owned = Arc::new(Mutex::new(vec![false; g.block_count as usize]));
    let started = Instant::now();
    std::thread::scope(|s| {
        for id in 0..4u64 {
            let (t, a, owned) = (&t, &a, &owned);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(0x5eed + id);
                let mut live: Vec<BlockRange> = Vec::new();
                for _ in 0..2000 {
                    let mut tx = t.journal.begin();
                    let mut mine = Vec::new();
                    for _ in 0..rng.random_range(1..5) {
                        if !live.is_empty() && rng.random_bool(0.4) {
                            let r = live.swap_remove(rng.random_range(0..live.len()));
                            // Our hook runs before the allocator's: the model forgets the
                            // blocks before anyone else can be handed them.
                            let o = Arc::clone(owned);
                            tx.on_commit(move || {
                                let mut o = o.lock().unwrap();
                                for b in r.start..r.end() {
                                    o[b as usize] = false;
                                }
                            });
                            a.free(&mut tx, r).unwrap();
                            continue;
                        }
                        let req = if rng.random_bool(0.15) {
                            AllocRequest {
                                blocks: rng.random_range(1..3) * CHUNK_BLOCKS,
                                min_blocks: 1,
                                aligned: true,
                                goal: None,
                            }
                        } else {
                            AllocRequest {
                                blocks: rng.random_range(1..40),
                                min_blocks: 1,
                                aligned: false,
                                goal: live
                                    .last()
                                    .filter(|_| rng.random_bool(0.3))
                                    .map(|r| r.end() - 1),
                            }
                        };
                        match a.allocate(&mut tx, req) {
                            Ok(r) => {
                                let mut o = owned.lock().unwrap();
                                for b in r.start..r.end() {
                                    assert!(!o[b as usize], "block {b} handed out twice");
                                    o[b as usize] = true;
                                }
                                mine.push(r);
                            }
                            Err(AllocError::NoSpace) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    if rng.random_bool(0.8) {
                        tx.commit().unwrap();
                        live.extend(mine);
                    } else {
                        // Forget our allocations before the rollback gives them back.
                        let mut o = owned.lock().unwrap();
                        for r in &mine {
                            for b in r.start..r.end() {
                                o[b as usize] = false;
                            }
                        }
                        drop(o);
                        drop(tx);
                    }
                    // Keep the device from filling up for good.
                    if live.len() > 40 {
                        let mut tx = t.journal.begin();
                        for r in live.drain(..20) {
                            let o = Arc::clone(owned);
                            tx.on_commit(move || {
                                let mut o = o.lock().unwrap();
                                for b in r.start..r.end() {
                                    o[b as usize] = false;
                                }
                            });
                            a.free(&mut tx, r).unwrap();
                        }
                        tx.commit().unwrap();
                    }
                }
            });
        }
    });
    a.check_against_bitmap(t.dev.as_ref()).unwrap();
    let used = owned.lock().unwrap().iter().filter(|&&b| b).count() as u64;
    assert_eq!(a.free_blocks(), a.data_blocks() - used);
    eprintln!(
        "{policy:?} with {} arenas, 4 threads: {:?}",
        a.arena_count(),
        started.elapsed()
    );
}

#[test]
fn concurrent_huge_aware() {
    concurrent(AllocPolicy::HugeAware, 8);
}

#[test]
fn concurrent_huge_aware_shared_arenas() {
    concurrent(AllocPolicy::HugeAware, 2);
}

#[test]
fn concurrent_first_fit() {
    concurrent(AllocPolicy::FirstFit, 1);
}
