//! Bitmaps: the one set of bit and word helpers for every bitmap pmfs keeps, on the media
//! and in memory (docs/FORMAT.md, "Bit order of bitmaps"): bit `b` is bit `b % 64` of
//! little-endian u64 word `b / 64`, equivalently bit `b % 8` of byte `b / 8`.
//!
//! - over in-memory words (`[u64]`): set/clear/test of ranges, searches and runs (the
//!   allocator's index, the checker's and the repair's block maps, [`Bits`]);
//! - over byte buffers holding the on-media layout ([`set_in_bytes`], [`le_words`]: mkfs,
//!   the checker and the repair read and write bitmap blocks this way);
//! - over media words ([`try_for_each_media_word`], [`byte_span`]: the journal's atomic
//!   8-byte bit updates and their undo records).
//!
//! Every search takes an explicit `limit` (exclusive) and never looks at bits at or past it,
//! nor past the end of the slice. (In the allocator's index a set bit means "free", the
//! opposite of the on-media bitmap, so finding free space is a search for set bits.)

/// Mask of bits `lo..hi` of one word (`lo < hi <= 64`).
pub fn word_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let width = hi - lo;
    if width == 64 {
        u64::MAX
    } else {
        ((1u64 << width) - 1) << lo
    }
}

/// Calls `f(word_index, mask)` for each word covering bits `first..first + count`.
pub fn for_each_word(first: u64, count: u64, mut f: impl FnMut(usize, u64)) {
    let end = first.saturating_add(count);
    let mut bit = first;
    while bit < end {
        let word = bit / 64;
        let lo = bit % 64;
        let hi = (end - word * 64).min(64);
        f(word as usize, word_mask(lo, hi));
        bit = (word + 1) * 64;
    }
}

/// Sets bits `first..first + count` (bits past the slice are ignored).
pub fn set_range(words: &mut [u64], first: u64, count: u64) {
    for_each_word(first, count, |w, m| {
        if let Some(x) = words.get_mut(w) {
            *x |= m;
        }
    });
}

/// Clears bits `first..first + count` (bits past the slice are ignored).
pub fn clear_range(words: &mut [u64], first: u64, count: u64) {
    for_each_word(first, count, |w, m| {
        if let Some(x) = words.get_mut(w) {
            *x &= !m;
        }
    });
}

/// True when every bit of `first..first + count` is set (bits past the slice count as clear).
pub fn all_set(words: &[u64], first: u64, count: u64) -> bool {
    let mut ok = true;
    for_each_word(first, count, |w, m| {
        ok &= words.get(w).is_some_and(|x| x & m == m);
    });
    ok
}

/// True when every bit of `first..first + count` is clear (bits past the slice count as clear).
pub fn all_clear(words: &[u64], first: u64, count: u64) -> bool {
    let mut ok = true;
    for_each_word(first, count, |w, m| {
        ok &= words.get(w).is_none_or(|x| x & m == 0);
    });
    ok
}

/// Bit `i` (false past the slice).
pub fn get(words: &[u64], i: u64) -> bool {
    words
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// First set bit in `from..limit`.
pub fn next_set(words: &[u64], from: u64, limit: u64) -> Option<u64> {
    let limit = limit.min(words.len() as u64 * 64);
    if from >= limit {
        return None;
    }
    let mut wi = (from / 64) as usize;
    let mut w = words.get(wi)? & (u64::MAX << (from % 64));
    loop {
        if w != 0 {
            let bit = wi as u64 * 64 + u64::from(w.trailing_zeros());
            return (bit < limit).then_some(bit);
        }
        wi += 1;
        if wi as u64 * 64 >= limit {
            return None;
        }
        w = *words.get(wi)?;
    }
}

/// First clear bit in `from..limit`, or `limit` when all are set.
pub fn next_clear(words: &[u64], from: u64, limit: u64) -> u64 {
    let limit = limit.min(words.len() as u64 * 64);
    if from >= limit {
        return limit;
    }
    let mut wi = (from / 64) as usize;
    let Some(&first) = words.get(wi) else {
        return limit;
    };
    let mut w = !first & (u64::MAX << (from % 64));
    loop {
        if w != 0 {
            let bit = wi as u64 * 64 + u64::from(w.trailing_zeros());
            return bit.min(limit);
        }
        wi += 1;
        if wi as u64 * 64 >= limit {
            return limit;
        }
        match words.get(wi) {
            Some(&x) => w = !x,
            None => return limit,
        }
    }
}

/// Last set bit in `0..before`.
pub fn prev_set(words: &[u64], before: u64) -> Option<u64> {
    let before = before.min(words.len() as u64 * 64);
    if before == 0 {
        return None;
    }
    let last = before - 1;
    let mut wi = (last / 64) as usize;
    let keep = last % 64 + 1;
    let mut w = words.get(wi)?
        & if keep == 64 {
            u64::MAX
        } else {
            (1 << keep) - 1
        };
    loop {
        if w != 0 {
            return Some(wi as u64 * 64 + 63 - u64::from(w.leading_zeros()));
        }
        if wi == 0 {
            return None;
        }
        wi -= 1;
        w = *words.get(wi)?;
    }
}

/// Runs of set bits in `from..limit`, in order, as `(start, len)`.
pub fn runs(words: &[u64], from: u64, limit: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut pos = from;
    std::iter::from_fn(move || {
        let start = next_set(words, pos, limit)?;
        let end = next_clear(words, start, limit);
        pos = end;
        Some((start, end - start))
    })
}

/// The first run of set bits in `from..limit` at least `want` long; failing that, the longest
/// run at least `min` long (the first of equals). Returns `(start, run_len)`: the caller takes
/// `run_len.min(want)` from `start`.
pub fn find_run(words: &[u64], from: u64, limit: u64, want: u64, min: u64) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    for (s, l) in runs(words, from, limit) {
        if l >= want {
            return Some((s, l));
        }
        if l >= min && best.is_none_or(|(_, bl)| l > bl) {
            best = Some((s, l));
        }
    }
    best
}

/// Length of the longest run of set bits in `from..limit`.
pub fn longest_run(words: &[u64], from: u64, limit: u64) -> u64 {
    runs(words, from, limit).map(|(_, l)| l).max().unwrap_or(0)
}

/// Sets bit `i` (ignored past the slice).
pub fn set(words: &mut [u64], i: u64) {
    if let Some(w) = words.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

/// True when any bit of `first..first + count` is set (bits past the slice count as clear).
pub fn any_set(words: &[u64], first: u64, count: u64) -> bool {
    !all_clear(words, first, count)
}

/// Bit `b` of a byte buffer in the on-media layout (false past its end).
pub fn get_in_bytes(bytes: &[u8], b: u64) -> bool {
    bytes
        .get((b / 8) as usize)
        .is_some_and(|x| x & (1 << (b % 8)) != 0)
}

/// Sets bits `first..first + count` of a byte buffer in the on-media layout (bits past its
/// end are ignored).
pub fn set_in_bytes(bytes: &mut [u8], first: u64, count: u64) {
    let end = first.saturating_add(count).min(bytes.len() as u64 * 8);
    for b in first..end {
        bytes[(b / 8) as usize] |= 1 << (b % 8);
    }
}

/// The little-endian u64 words of a byte buffer in the on-media layout (a trailing partial
/// word is left out).
pub fn le_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| c.try_into().map_or(0, u64::from_le_bytes))
}

/// Set bits among the first `limit` bits of a byte buffer in the on-media layout.
pub fn count_set_in_bytes(bytes: &[u8], limit: u64) -> u64 {
    le_words(bytes)
        .enumerate()
        .map(|(w, word)| {
            let first = w as u64 * 64;
            if first >= limit {
                0
            } else if first + 64 > limit {
                u64::from((word & word_mask(0, limit - first)).count_ones())
            } else {
                u64::from(word.count_ones())
            }
        })
        .sum()
}

/// The byte range `(offset, len)` of the whole 8-byte words of the bitmap at byte offset
/// `base` that hold bits `first..first + count` (`count` > 0).
pub fn byte_span(base: u64, first: u64, count: u64) -> (u64, u64) {
    let first_word = first / 64;
    let last_word = (first + count - 1) / 64;
    (base + first_word * 8, (last_word - first_word + 1) * 8)
}

/// Calls `f(word_offset, mask)` for each 8-byte word of the bitmap at byte offset `base`
/// covering bits `first..first + count`, stopping at the first error.
pub fn try_for_each_media_word<E>(
    base: u64,
    first: u64,
    count: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let mut r = Ok(());
    for_each_word(first, count, |w, m| {
        if r.is_ok() {
            r = f(base + w as u64 * 8, m);
        }
    });
    r
}

/// A bit set of blocks in memory, in the on-media layout (the checker's and the repair's
/// "claimed" maps).
#[derive(Clone, Debug, Default)]
pub struct Bits {
    pub words: Vec<u64>,
}

impl Bits {
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub fn len(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn get(&self, b: u64) -> bool {
        get(&self.words, b)
    }

    pub fn set(&mut self, b: u64) {
        set(&mut self.words, b);
    }

    pub fn set_range(&mut self, first: u64, count: u64) {
        set_range(&mut self.words, first, count);
    }

    /// True when any block of `first..first + count` is set (or lies outside the map).
    pub fn any(&self, first: u64, count: u64) -> bool {
        match first.checked_add(count) {
            Some(end) if end <= self.len() => any_set(&self.words, first, count),
            _ => true,
        }
    }

    /// The first clear bit at or after `from` and below `end`.
    pub fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len());
        let b = next_clear(&self.words, from, end);
        (b < end).then_some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_runs(bits: &[bool], from: usize, limit: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = from;
        while i < limit {
            if bits[i] {
                let s = i;
                while i < limit && bits[i] {
                    i += 1;
                }
                out.push((s as u64, (i - s) as u64));
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn runs_match_a_naive_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            let nbits = 1 + (round * 7) % 300;
            let mut bits = vec![false; nbits];
            for b in bits.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed % 3 != 0;
            }
            let mut words = vec![0u64; nbits.div_ceil(64)];
            for (i, &b) in bits.iter().enumerate() {
                if b {
                    set_range(&mut words, i as u64, 1);
                }
            }
            let from = round % nbits;
            let got: Vec<_> = runs(&words, from as u64, nbits as u64).collect();
            assert_eq!(got, naive_runs(&bits, from, nbits));
            let last = bits[..from.max(1)].iter().rposition(|&b| b);
            assert_eq!(prev_set(&words, from.max(1) as u64), last.map(|x| x as u64));
            for (i, &b) in bits.iter().enumerate() {
                assert_eq!(get(&words, i as u64), b);
            }
        }
    }

    #[test]
    fn ranges_and_masks() {
        let mut w = vec![0u64; 4];
        set_range(&mut w, 3, 130);
        assert!(all_set(&w, 3, 130));
        assert!(!all_set(&w, 2, 2));
        assert!(all_clear(&w, 133, 123));
        assert_eq!(next_set(&w, 0, 256), Some(3));
        assert_eq!(next_clear(&w, 3, 256), 133);
        assert_eq!(next_clear(&w, 3, 100), 100);
        clear_range(&mut w, 64, 64);
        assert_eq!(longest_run(&w, 0, 256), 61);
        assert_eq!(find_run(&w, 0, 256, 5, 1), Some((3, 61)));
        assert_eq!(find_run(&w, 0, 256, 62, 1), Some((3, 61)));
        assert_eq!(find_run(&w, 0, 256, 62, 62), None);
        assert_eq!(prev_set(&w, 256), Some(132));
        assert_eq!(word_mask(0, 64), u64::MAX);
    }

    #[test]
    fn bits_set_get_next_clear() {
        let mut b = Bits::new(200);
        b.set_range(0, 70);
        assert!(b.get(69) && !b.get(70));
        assert_eq!(b.next_clear(0, 200), Some(70));
        b.set_range(70, 100);
        assert_eq!(b.next_clear(3, 200), Some(170));
        assert_eq!(b.next_clear(3, 160), None);
        assert!(b.any(169, 2));
        assert!(!b.any(170, 2));
        assert!(b.any(190, 100));
        assert!(b.any(u64::MAX, 2));
    }

    #[test]
    fn bytes_and_media_words_agree_with_words() {
        let mut bytes = vec![0u8; 32];
        set_in_bytes(&mut bytes, 5, 70);
        let words: Vec<u64> = le_words(&bytes).collect();
        let mut want = vec![0u64; 4];
        set_range(&mut want, 5, 70);
        assert_eq!(words, want);
        assert!(get_in_bytes(&bytes, 74) && !get_in_bytes(&bytes, 75) && !get_in_bytes(&bytes, 4));
        assert_eq!(count_set_in_bytes(&bytes, 256), 70);
        assert_eq!(count_set_in_bytes(&bytes, 64), 59);
        assert_eq!(byte_span(1000, 5, 70), (1000, 16));
        assert_eq!(byte_span(1000, 64, 1), (1008, 8));
        let mut seen = Vec::new();
        try_for_each_media_word::<()>(1000, 60, 10, |o, m| {
            seen.push((o, m));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(1000, 0xf << 60), (1008, 0x3f)]);
        assert_eq!(
            try_for_each_media_word(0, 0, 200, |o, _| if o == 8 { Err(o) } else { Ok(()) }),
            Err(8)
        );
    }
}
