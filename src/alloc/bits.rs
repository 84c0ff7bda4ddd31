//! Word-at-a-time helpers over in-memory bit sets (`[u64]`, bit `i` = word `i / 64`, bit
//! `i % 64`). In the allocator's in-memory index a **set** bit means "free" (the opposite of
//! the persistent bitmap, where a set bit means "allocated"), so that finding free space is a
//! search for set bits with `trailing_zeros`.
//!
//! Every function takes an explicit `limit` (exclusive) and never looks at bits at or past it,
//! nor past the end of the slice.

/// Mask of bits `lo..hi` of one word (`lo < hi <= 64`).
pub(crate) fn word_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let width = hi - lo;
    if width == 64 {
        u64::MAX
    } else {
        ((1u64 << width) - 1) << lo
    }
}

/// Calls `f(word_index, mask)` for each word covering bits `first..first + count`.
pub(crate) fn for_each_word(first: u64, count: u64, mut f: impl FnMut(usize, u64)) {
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
pub(crate) fn set_range(words: &mut [u64], first: u64, count: u64) {
    for_each_word(first, count, |w, m| {
        if let Some(x) = words.get_mut(w) {
            *x |= m;
        }
    });
}

/// Clears bits `first..first + count` (bits past the slice are ignored).
pub(crate) fn clear_range(words: &mut [u64], first: u64, count: u64) {
    for_each_word(first, count, |w, m| {
        if let Some(x) = words.get_mut(w) {
            *x &= !m;
        }
    });
}

/// True when every bit of `first..first + count` is set (bits past the slice count as clear).
pub(crate) fn all_set(words: &[u64], first: u64, count: u64) -> bool {
    let mut ok = true;
    for_each_word(first, count, |w, m| {
        ok &= words.get(w).is_some_and(|x| x & m == m);
    });
    ok
}

/// True when every bit of `first..first + count` is clear (bits past the slice count as clear).
pub(crate) fn all_clear(words: &[u64], first: u64, count: u64) -> bool {
    let mut ok = true;
    for_each_word(first, count, |w, m| {
        ok &= words.get(w).is_none_or(|x| x & m == 0);
    });
    ok
}

/// Bit `i` (false past the slice).
pub(crate) fn get(words: &[u64], i: u64) -> bool {
    words
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// First set bit in `from..limit`.
pub(crate) fn next_set(words: &[u64], from: u64, limit: u64) -> Option<u64> {
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
pub(crate) fn next_clear(words: &[u64], from: u64, limit: u64) -> u64 {
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
pub(crate) fn prev_set(words: &[u64], before: u64) -> Option<u64> {
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
pub(crate) fn runs(words: &[u64], from: u64, limit: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
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
pub(crate) fn find_run(
    words: &[u64],
    from: u64,
    limit: u64,
    want: u64,
    min: u64,
) -> Option<(u64, u64)> {
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
pub(crate) fn longest_run(words: &[u64], from: u64, limit: u64) -> u64 {
    runs(words, from, limit).map(|(_, l)| l).max().unwrap_or(0)
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
}
