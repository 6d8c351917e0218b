//! SplitMix64: deterministic pseudo-random test data, the same sequence on
//! the host and on the Cortex-M7. The unit tests draw their cases from it
//! (seeded by proptest or fixed), and so does the firmware's on-target
//! self-test (`firmware/src/selftest.rs`, which enables the `rng` feature).
//! Not for anything but tests: it is fast and reproducible, not secure.

/// A SplitMix64 stream; the field is its state (the seed to start with).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 0
    }

    /// Uniform in `lo..=hi` (`lo <= hi`).
    pub fn range_i32(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next_u64() % ((hi as i64 - lo as i64 + 1) as u64)) as i32
    }

    /// An int8 value, with the extremes -128 and 127 over-represented (one
    /// draw in eight is one of them).
    pub fn i8(&mut self) -> i8 {
        match self.next_u64() % 16 {
            0 => -128,
            1 => 127,
            _ => self.next_u64() as i8,
        }
    }

    /// `n` values of [`i8`](Self::i8).
    #[cfg(test)]
    pub fn i8s(&mut self, n: usize) -> std::vec::Vec<i8> {
        (0..n).map(|_| self.i8()).collect()
    }
}
