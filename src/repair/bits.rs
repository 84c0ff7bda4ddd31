//! A bitmap of blocks in memory (the layout of the on-media bitmap: bit `b % 64` of word
//! `b / 64`).

#[derive(Clone, Debug, Default)]
pub(super) struct Bits {
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

    pub fn get(&self, b: u64) -> bool {
        self.words
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    pub fn set(&mut self, b: u64) {
        if let Some(w) = self.words.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
    }

    pub fn set_range(&mut self, first: u64, count: u64) {
        for b in first..first.saturating_add(count).min(self.len()) {
            self.set(b);
        }
    }

    /// True when any block of `first..first + count` is set (or lies outside the map).
    pub fn any(&self, first: u64, count: u64) -> bool {
        let Some(end) = first.checked_add(count) else {
            return true;
        };
        if end > self.len() {
            return true;
        }
        (first..end).any(|b| self.get(b))
    }

    /// The first clear bit at or after `from` and below `end`.
    pub fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        let mut b = from;
        while b < end.min(self.len()) {
            let w = self.words[(b / 64) as usize] | ((1u64 << (b % 64)) - 1);
            if w == u64::MAX {
                b = (b / 64 + 1) * 64;
                continue;
            }
            let found = (b / 64) * 64 + u64::from((!w).trailing_zeros());
            return (found < end).then_some(found);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_next_clear() {
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
    }
}
