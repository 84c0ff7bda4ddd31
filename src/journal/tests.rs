//! Journal tests on the recording device: every transaction is all-or-nothing at every
//! fence, and committed transactions survive, also when transactions interleave over one
//! bitmap word.

use super::*;
use crate::device::RecordingDevice;

const SIZE: u64 = 16 << 20;

fn setup() -> (Arc<RecordingDevice>, Geometry) {
    let dev = Arc::new(RecordingDevice::new(SIZE));
    let g = Geometry::for_device_size(SIZE).unwrap();
    format_slots(dev.as_ref(), &g).unwrap();
    (dev, g)
}

fn open(dev: &Arc<RecordingDevice>, g: Geometry) -> Journal {
    let media: Arc<dyn Media> = dev.clone();
    Journal::open(media, g).unwrap().0
}

fn read_u64(m: &dyn Media, off: u64) -> u64 {
    m.load_u64(off).unwrap()
}

/// Recovers every crash image before fence `f` and hands the recovered device to `check`.
fn for_each_crash_state(
    dev: &RecordingDevice,
    g: &Geometry,
    mut check: impl FnMut(usize, &RecordingDevice),
) -> usize {
    let mut states = 0;
    for f in 0..=dev.fence_count() {
        for image in dev.crash_images(f).enumerate(6, 48, f as u64 + 1) {
            let d = RecordingDevice::from_image(image);
            recover(&d, g).unwrap();
            // Recovery is idempotent: a second run finds nothing to do.
            assert_eq!(recover(&d, g).unwrap(), RecoveryReport::default());
            check(f, &d);
            states += 1;
        }
    }
    states
}

#[test]
fn one_transaction_is_atomic_at_every_fence() {
    let (dev, g) = setup();
    let j = open(&dev, g);
    let a = g.bitmap_offset() + 4096 * 3;
    let b = a + 8192 + 40; // a second, unaligned range in another block
    let bitmap = g.bitmap_offset();
    dev.write(a, &[0x11; 100]).unwrap();
    dev.write(b, &[0x22; 300]).unwrap();
    dev.sync_all().unwrap();
    dev.start_recording();
    let mut tx = j.begin();
    tx.write(a, &[0xaa; 100]).unwrap();
    tx.write(b, &[0xbb; 300]).unwrap();
    tx.write(a + 10, &[0xcc; 10]).unwrap(); // already logged: no second record
    tx.set_bits(bitmap, 1000, 70).unwrap();
    tx.commit().unwrap();
    let committed_at = dev.fence_count();
    let states = for_each_crash_state(&dev, &g, |f, d| {
        let mut ra = [0u8; 100];
        let mut rb = [0u8; 300];
        d.read(a, &mut ra).unwrap();
        d.read(b, &mut rb).unwrap();
        let bits = read_u64(d, bitmap + 1000 / 64 * 8);
        let old = ra == [0x11; 100] && rb == [0x22; 300] && bits == 0;
        let mut new_a = [0xaa; 100];
        new_a[10..20].fill(0xcc);
        let new = ra == new_a && rb == [0xbb; 300] && bits != 0;
        assert!(old || new, "fence {f}: a mix of old and new state");
        if f >= committed_at {
            assert!(new, "fence {f}: committed transaction lost");
        }
    });
    assert!(states > 10, "only {states} crash states checked");
}

#[test]
fn dropped_transaction_rolls_back_and_runs_abort_hooks() {
    let (dev, g) = setup();
    let j = open(&dev, g);
    let a = g.bitmap_offset() + 4096 * 5;
    let aborted = std::sync::atomic::AtomicBool::new(false);
    {
        let mut tx = j.begin();
        tx.write(a, &[7; 64]).unwrap();
        tx.set_bits(g.bitmap_offset(), 3, 2).unwrap();
        tx.on_abort(|| aborted.store(true, std::sync::atomic::Ordering::SeqCst));
    }
    assert!(aborted.load(std::sync::atomic::Ordering::SeqCst));
    let mut buf = [1u8; 64];
    dev.read(a, &mut buf).unwrap();
    assert_eq!(buf, [0; 64]);
    assert_eq!(read_u64(dev.as_ref(), g.bitmap_offset()), 0);
    // The slot is reusable and the next transaction commits normally.
    let mut tx = j.begin();
    tx.write(a, &[9; 8]).unwrap();
    tx.commit().unwrap();
    assert_eq!(read_u64(dev.as_ref(), a), u64::from_le_bytes([9; 8]));
}

#[test]
fn oversized_transaction_is_refused_and_rolled_back() {
    let (dev, g) = setup();
    let j = open(&dev, g);
    let a = g.bitmap_offset() + 4096;
    let mut tx = j.begin();
    let big = vec![5u8; g.slot_size() as usize];
    assert!(matches!(tx.write(a, &big), Err(JournalError::TooLarge)));
    drop(tx);
    let mut buf = [1u8; 16];
    dev.read(a, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
}

/// Two transactions interleave over the same bitmap word: A sets bit 0, B sets bit 1, A
/// clears a bit B does not own. Whatever the crash point, each is all-or-nothing on its own,
/// and B's commit is never undone by A's rollback (the hazard of byte-range undo logging).
#[test]
fn interleaved_transactions_on_one_bitmap_word() {
    let (dev, g) = setup();
    let j = open(&dev, g);
    let bitmap = g.bitmap_offset();
    let cell_a = bitmap + 8 * 4096;
    let cell_b = cell_a + 64;
    // Bit 40 starts set; A clears it.
    dev.write(bitmap, &(1u64 << 40).to_le_bytes()).unwrap();
    dev.sync_all().unwrap();
    dev.start_recording();
    let mut ta = j.begin();
    let mut tb = j.begin_interleaved_for_test();
    ta.set_bits(bitmap, 0, 1).unwrap();
    tb.set_bits(bitmap, 1, 1).unwrap();
    ta.clear_bits(bitmap, 40, 1).unwrap();
    tb.write(cell_b, &[0xb; 8]).unwrap();
    ta.write(cell_a, &[0xa; 8]).unwrap();
    tb.commit().unwrap();
    let b_at = dev.fence_count();
    ta.commit().unwrap();
    let a_at = dev.fence_count();
    let states = for_each_crash_state(&dev, &g, |f, d| {
        let w = read_u64(d, bitmap);
        let a_new =
            w & 1 != 0 && w & (1 << 40) == 0 && read_u64(d, cell_a) == u64::from_le_bytes([0xa; 8]);
        let a_old = w & 1 == 0 && w & (1 << 40) != 0 && read_u64(d, cell_a) == 0;
        let b_new = w & 2 != 0 && read_u64(d, cell_b) == u64::from_le_bytes([0xb; 8]);
        let b_old = w & 2 == 0 && read_u64(d, cell_b) == 0;
        assert!(a_new || a_old, "fence {f}: A torn (word {w:#x})");
        assert!(b_new || b_old, "fence {f}: B torn (word {w:#x})");
        if f >= b_at {
            assert!(b_new, "fence {f}: B committed but lost");
        }
        if f >= a_at {
            assert!(a_new, "fence {f}: A committed but lost");
        }
    });
    assert!(states > 10);
}

/// Real threads hammer one bitmap word; each transaction sets its own bit and writes its own
/// cell. After a crash at any fence each (bit, cell) pair is all-or-nothing.
#[test]
fn concurrent_threads_crash_at_every_fence() {
    let (dev, g) = setup();
    let j = open(&dev, g);
    let bitmap = g.bitmap_offset();
    let cells = bitmap + 16 * 4096;
    dev.start_recording();
    let committed: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (j, dev, committed) = (&j, &dev, &committed);
            s.spawn(move || {
                for i in 0..4u64 {
                    let bit = t * 4 + i;
                    let mut tx = j.begin();
                    tx.set_bits(bitmap, bit, 1).unwrap();
                    tx.write(cells + bit * 64, &(bit + 1).to_le_bytes())
                        .unwrap();
                    tx.commit().unwrap();
                    committed.lock().push((bit, dev.fence_count()));
                }
            });
        }
    });
    let committed = committed.into_inner();
    let states = for_each_crash_state(&dev, &g, |f, d| {
        let w = read_u64(d, bitmap);
        for bit in 0..16u64 {
            let set = w & (1 << bit) != 0;
            let cell = read_u64(d, cells + bit * 64);
            assert_eq!(set, cell == bit + 1, "fence {f}: transaction {bit} torn");
            if committed.iter().any(|&(b, at)| b == bit && f >= at) {
                assert!(set, "fence {f}: committed transaction {bit} lost");
            }
        }
    });
    assert!(states >= 16);
}

#[test]
fn corrupted_slot_header_is_reported() {
    let (dev, g) = setup();
    dev.write(g.slot_offset(2), &[0xff; 8]).unwrap();
    assert!(matches!(
        recover(dev.as_ref(), &g),
        Err(JournalError::Format(FormatError::Corrupted { .. }))
    ));
}

#[test]
fn hostile_record_outside_metadata_is_refused() {
    let (dev, g) = setup();
    // An open slot whose (checksummed) record points at the journal itself.
    let slot = g.slot_offset(0);
    dev.store_u64(slot + GENERATION_OFFSET, 1).unwrap();
    let mut h = UndoHeader {
        generation: 1,
        target: slot,
        first: 0,
        len: 8,
        kind: UndoKind::Bytes as u16,
        pad: 0,
        crc: 0,
        pad2: 0,
    };
    h.crc = record_crc(&h, &[0; 8]);
    dev.write(slot + RECORDS_OFFSET, h.as_bytes()).unwrap();
    assert!(recover(dev.as_ref(), &g).is_err());
}

/// Fail-stop, commit side: a flush that fails during commit poisons the journal. Neither
/// hook runs (what the transaction allocated stays taken, what it freed stays unusable),
/// every later transaction fails at its first store, none waits for the lost slot, and
/// recovery at the next open rolls the transaction back.
#[test]
fn a_failed_commit_poisons_the_journal_and_recovery_rolls_it_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (dev, g) = setup();
    let j = open(&dev, g);
    let a = g.bitmap_offset() + 4096 * 5;
    let (committed, aborted) = (AtomicBool::new(false), AtomicBool::new(false));
    let mut tx = j.begin();
    tx.write(a, &[7; 64]).unwrap();
    tx.on_commit(|| committed.store(true, Ordering::SeqCst));
    tx.on_abort(|| aborted.store(true, Ordering::SeqCst));
    dev.fail_flushes_after(Some(0));
    assert!(matches!(tx.commit(), Err(JournalError::Device(_))));
    assert!(j.is_poisoned());
    assert!(!committed.load(Ordering::SeqCst) && !aborted.load(Ordering::SeqCst));
    dev.fail_flushes_after(None);
    // More transactions than slots: each fails at once, none waits.
    for _ in 0..2 * g.journal_slots {
        let mut tx = j.begin();
        assert!(matches!(tx.write(a, &[1; 8]), Err(JournalError::Poisoned)));
        assert!(matches!(tx.commit(), Err(JournalError::Poisoned)));
    }
    drop(j);
    let (_, report) = Journal::open(dev.clone(), g).unwrap();
    assert_eq!(
        report.rolled_back, 1,
        "its rollback failed too: recovery does it"
    );
    let mut buf = [1u8; 64];
    dev.read(a, &mut buf).unwrap();
    assert_eq!(
        buf, [0; 64],
        "the failed transaction is rolled back by recovery"
    );
}

/// Fail-stop, rollback side: a rollback whose undo cannot be flushed poisons the journal
/// and leaves the slot open on the media, where recovery finishes the rollback.
#[test]
fn a_failed_rollback_poisons_the_journal_and_recovery_finishes_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (dev, g) = setup();
    let j = open(&dev, g);
    let a = g.bitmap_offset() + 4096 * 5;
    let aborted = AtomicBool::new(false);
    {
        let mut tx = j.begin();
        tx.write(a, &[7; 64]).unwrap();
        tx.on_abort(|| aborted.store(true, Ordering::SeqCst));
        dev.fail_flushes_after(Some(0));
    } // dropped: the rollback's flushes fail
    assert!(j.is_poisoned());
    assert!(
        !aborted.load(Ordering::SeqCst),
        "abort hooks must not run after a failed rollback"
    );
    dev.fail_flushes_after(None);
    drop(j);
    let (_, report) = Journal::open(dev.clone(), g).unwrap();
    assert_eq!(report.rolled_back, 1, "the slot was left open for recovery");
    let mut buf = [1u8; 64];
    dev.read(a, &mut buf).unwrap();
    assert_eq!(buf, [0; 64]);
}
