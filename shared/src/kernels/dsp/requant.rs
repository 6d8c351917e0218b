//! Per-channel requantization with the per-channel work hoisted out:
//! bit-identical to [`crate::quant::requantize`] (TFLM double rounding).
//!
//! * `SaturatingRoundingDoublingHighMul(x, m)` is `floor((x * m + 2^30) /
//!   2^31)` for every pair except `x = m = i32::MIN` (the one saturating
//!   case): the reference's "nudge then truncate" equals this floor on both
//!   signs. One SMULL and a 64-bit add.
//! * `RoundingDivideByPOT` keeps the reference's mask/threshold form with the
//!   mask precomputed.
//! * `clamp(r.saturating_add(offset), lo, hi)` equals
//!   `clamp(ssat10(r) + offset, lo, hi)` because `offset` and the clamp lie
//!   in `-128..=127`.

use super::isa::{smmlar, ssat10};
use crate::quant::{multiply_by_quantized_multiplier, requantize};

/// The Cortex-M7 requantization of a [`ChannelRequant`] with `left == 0`
/// (the arithmetic of its portable lines: SMULL doubling-high with
/// rounding, rounding right shift, QADD of the output offset, SSAT, lower
/// clamp), then the instructions in `[...]` (an upper clamp, when wanted)
/// with their extra operands. Evaluates to the result in `{x}`.
#[cfg(armv7em)]
macro_rules! channel_requant_asm {
    ($q:expr, $acc:expr, [$($tail:literal),*] $(, $name:ident = in(reg) $val:expr)*) => {{
        let r: i32;
        // SAFETY: register-only arithmetic, no memory. No
        // `preserves_flags`: ADDS/LSRS/ASRS/CMP set N, Z, C, V and
        // QADD/SSAT may set Q.
        unsafe {
            core::arch::asm!(
                "smull {lo}, {hi}, {x}, {m}",
                "adds {lo}, {lo}, #0x40000000",
                "adc {hi}, {hi}, #0",
                "lsrs {lo}, {lo}, #31",
                "orr {x}, {lo}, {hi}, lsl #1",
                "and {lo}, {x}, {mask}",
                "add {hi}, {half}, {x}, lsr #31",
                "asrs {x}, {x}, {e}",
                "cmp {lo}, {hi}",
                "it hi",
                "addhi {x}, {x}, #1",
                "qadd {x}, {x}, {off}",
                "ssat {x}, #8, {x}",
                "cmp {x}, {min}",
                "it lt",
                "movlt {x}, {min}",
                $($tail,)*
                x = inout(reg) $acc => r,
                m = in(reg) $q.multiplier,
                mask = in(reg) $q.mask,
                half = in(reg) $q.half,
                e = in(reg) $q.right,
                off = in(reg) $q.offset,
                min = in(reg) $q.min as i32,
                $($name = in(reg) $val,)*
                lo = out(reg) _,
                hi = out(reg) _,
                options(pure, nomem, nostack),
            );
        }
        r
    }};
}

/// The asm text of [`FoldedRequant::scale_sat8`] on register `{$x}`, with
/// scratch `{$t}` and the operands `{c}`, `{m}`, `{e}` of
/// [`FoldedRequant::parts`]: `QADD` doubling, the sign nudge, `SMMLAR`,
/// `ASR`, `SSAT` (5 instructions). Every kernel that inlines the folded
/// requantization in its own `asm!` uses this text.
#[cfg(armv7em)]
macro_rules! folded_requant {
    ($x:literal, $t:literal) => {
        concat!(
            "qadd {",
            $x,
            "}, {",
            $x,
            "}, {",
            $x,
            "}\n",
            "add {",
            $t,
            "}, {c}, {",
            $x,
            "}, asr #31\n",
            "smmlar {",
            $x,
            "}, {",
            $x,
            "}, {m}, {",
            $t,
            "}\n",
            "asr {",
            $x,
            "}, {",
            $x,
            "}, {e}\n",
            "ssat {",
            $x,
            "}, #8, {",
            $x,
            "}\n",
        )
    };
}
#[cfg(armv7em)]
pub(crate) use folded_requant;

/// One output channel's requantization, prepared.
#[derive(Debug, Clone, Copy)]
pub struct ChannelRequant {
    multiplier: i32,
    shift: i32,
    left: u32,
    right: u32,
    mask: i32,
    half: i32,
    offset: i32,
    min: i8,
    max: i8,
}

impl ChannelRequant {
    /// `shift` in `MIN_SHIFT..=MAX_SHIFT` (validated by the kernels).
    #[inline(always)]
    pub fn new(multiplier: i32, shift: i32, offset: i32, min: i8, max: i8) -> Self {
        let left = if shift > 0 { shift as u32 } else { 0 };
        let right = if shift > 0 { 0 } else { (-shift) as u32 & 31 };
        let mask = ((1i64 << right) - 1) as i32;
        Self {
            multiplier,
            shift,
            left,
            right,
            mask,
            half: mask >> 1,
            offset,
            min,
            max,
        }
    }

    /// `requantize(acc, multiplier, shift, offset, min, max)`.
    #[inline(always)]
    pub fn apply(&self, acc: i32) -> i8 {
        if self.multiplier == i32::MIN {
            return requantize(
                acc,
                self.multiplier,
                self.shift,
                self.offset,
                self.min,
                self.max,
            );
        }
        let v = ssat10(self.scale_unchecked(acc)) + self.offset;
        v.clamp(self.min as i32, self.max as i32) as i8
    }

    /// [`apply`](Self::apply) for a multiplier other than `i32::MIN` (the
    /// caller checks that once per layer).
    #[inline(always)]
    pub fn apply_no_min(&self, acc: i32) -> i8 {
        debug_assert!(self.multiplier != i32::MIN);
        #[cfg(armv7em)]
        if self.left == 0 {
            // The arithmetic of the portable lines below, as 18 instructions
            // (the compiler's version spills the per-channel constants).
            let r = channel_requant_asm!(
                self,
                acc,
                ["cmp {x}, {max}", "it gt", "movgt {x}, {max}"],
                max = in(reg) self.max as i32
            );
            return r as i8;
        }
        let v = ssat10(self.scale_unchecked(acc)) + self.offset;
        v.clamp(self.min as i32, self.max as i32) as i8
    }

    /// `true` when the upper clamp is 127 (no clamp beyond int8
    /// saturation: every ReLU and plain conv of the exporter).
    #[inline(always)]
    pub fn max_is_127(&self) -> bool {
        self.max == i8::MAX
    }

    /// [`apply_no_min`](Self::apply_no_min) when [`max_is_127`](Self::max_is_127).
    #[inline(always)]
    pub fn apply_no_min_max127(&self, acc: i32) -> i8 {
        debug_assert!(self.multiplier != i32::MIN && self.max == i8::MAX);
        #[cfg(armv7em)]
        if self.left == 0 {
            // As `apply_no_min` without the upper clamp: 15 instructions.
            let r = channel_requant_asm!(self, acc, []);
            return r as i8;
        }
        let v = ssat10(self.scale_unchecked(acc)) + self.offset;
        v.max(self.min as i32).min(127) as i8
    }

    /// `multiply_by_quantized_multiplier(x, multiplier, shift)`.
    #[inline(always)]
    pub fn scale(&self, x: i32) -> i32 {
        if self.multiplier == i32::MIN {
            return multiply_by_quantized_multiplier(x, self.multiplier, self.shift);
        }
        self.scale_unchecked(x)
    }

    /// [`scale`](Self::scale) for `multiplier != i32::MIN`.
    #[inline(always)]
    fn scale_unchecked(&self, x: i32) -> i32 {
        let x = x.wrapping_shl(self.left);
        let y = ((x as i64 * self.multiplier as i64 + (1 << 30)) >> 31) as i32;
        let remainder = y & self.mask;
        let threshold = self.half + (y < 0) as i32;
        (y >> self.right) + (remainder > threshold) as i32
    }
}

/// A folded requantization: the whole of [`ChannelRequant::apply_no_min`]
/// in five instructions (`QADD` doubling, the sign nudge, `SMMLAR`, `ASR`,
/// `SSAT`) plus the clamps, for the channels [`FoldedRequant::new`] accepts:
/// multiplier in `(2^30, 2^31)` (every exported one but exactly `2^30`) and
/// shift in `-21..=-1`.
///
/// With `e = -shift`, `rnd = 2^(e-1)` and `neg = (x < 0)` the reference is
/// `floor((x * m + 2^30 + (rnd - neg + offset * 2^e) * 2^31) / 2^(31 + e))`
/// (the two floors of SRDHM and RDBPOT merge, and so does the offset), and
/// `y = SRDHM(x, m) < 0` exactly when `x < 0` because `m > 2^30`. Doubled,
/// that is `SMMLAR(2x, m, c) >> e` with `c = rnd - neg + offset * 2^e`.
/// `2x` saturates (QADD) only when `|x| >= 2^30`, and then both the
/// reference and this saturate the int8 output the same way: `|y| >= 2^29`,
/// `|y >> e| >= 256` for `e <= 21`, beyond any offset.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct FoldedRequant {
    multiplier: i32,
    /// `rnd + offset * 2^e`; the sign nudge subtracts 1 for `x < 0`.
    c: i32,
    e: u32,
}

// `repr(C)` field order, which `asm!` in `dsp::conv` relies on: the
// multiplier, then `c`, then `e`, 4 bytes each.
const _: () = assert!(
    core::mem::offset_of!(FoldedRequant, multiplier) == 0
        && core::mem::offset_of!(FoldedRequant, c) == 4
        && core::mem::offset_of!(FoldedRequant, e) == 8
        && core::mem::size_of::<FoldedRequant>() == 12
);

impl FoldedRequant {
    /// A valid value to fill tables with before they are written.
    pub const PLACEHOLDER: Self = Self {
        multiplier: i32::MAX,
        c: 1,
        e: 1,
    };

    /// `None` unless `2^30 < multiplier` and `-21 <= shift <= -1`.
    #[inline(always)]
    pub fn new(multiplier: i32, shift: i32, offset: i32) -> Option<Self> {
        if multiplier <= (1 << 30) || !(-21..=-1).contains(&shift) {
            return None;
        }
        let e = (-shift) as u32;
        Some(Self::new_unchecked(multiplier, e, offset))
    }

    /// `true` when [`new`](Self::new) accepts `(multiplier, shift)`.
    #[inline(always)]
    pub fn accepts(multiplier: i32, shift: i32) -> bool {
        multiplier > (1 << 30) && (-21..=-1).contains(&shift)
    }

    /// [`new`](Self::new) for a pair that [`accepts`](Self::accepts), with `e = -shift`.
    #[inline(always)]
    pub fn new_unchecked(multiplier: i32, e: u32, offset: i32) -> Self {
        debug_assert!(multiplier > (1 << 30) && (1..=21).contains(&e));
        Self {
            multiplier,
            c: (1i32 << (e - 1)) + (offset << e),
            e,
        }
    }

    /// `requantize(acc, m, shift, offset, min, 127)` before the lower clamp:
    /// the int8-saturated value.
    #[inline(always)]
    pub fn scale_sat8(&self, acc: i32) -> i32 {
        #[cfg(armv7em)]
        {
            let r: i32;
            // SAFETY: register-only arithmetic, no memory. QADD and SSAT
            // may set the Q flag, so no `preserves_flags`.
            unsafe {
                core::arch::asm!(
                    folded_requant!("x", "t"),
                    x = inout(reg) acc => r,
                    c = in(reg) self.c,
                    t = out(reg) _,
                    m = in(reg) self.multiplier,
                    e = in(reg) self.e,
                    options(pure, nomem, nostack),
                );
            }
            r
        }
        #[cfg(not(armv7em))]
        {
            use super::isa::{qadd, ssat8};
            let x2 = qadd(acc, acc);
            let c = self.c.wrapping_add(x2 >> 31);
            ssat8(smmlar(x2, self.multiplier, c) >> self.e)
        }
    }

    /// `multiply_by_quantized_multiplier(x, m, shift)` for `|x| < 2^30`, a
    /// multiplier in `(2^30, 2^31)` and `shift` in `-31..=-1`, through
    /// [`unsat`](Self::unsat): `SMMLAR(2x, m, rnd - neg) >> e` with no
    /// saturation anywhere (the derivation of the type's doc, offset 0).
    #[inline(always)]
    pub fn scale_small(&self, x: i32) -> i32 {
        debug_assert!(x.unsigned_abs() < 1 << 30);
        smmlar(x << 1, self.multiplier, self.c.wrapping_add(x >> 31)) >> self.e
    }

    /// For [`scale_small`](Self::scale_small): `None` unless `2^30 <
    /// multiplier` and `-31 <= shift <= -1`.
    #[inline(always)]
    pub fn unsat(multiplier: i32, shift: i32) -> Option<Self> {
        if multiplier <= (1 << 30) || !(-31..=-1).contains(&shift) {
            return None;
        }
        let e = (-shift) as u32;
        Some(Self {
            multiplier,
            c: 1i32 << (e - 1),
            e,
        })
    }

    /// `(multiplier, c, e)` for kernels that inline [`scale_sat8`](Self::scale_sat8)'s
    /// five instructions in their own `asm!`.
    #[inline(always)]
    pub fn parts(&self) -> (i32, i32, u32) {
        (self.multiplier, self.c, self.e)
    }

    /// `requantize(acc, m, shift, offset, min, 127)`.
    #[inline(always)]
    pub fn apply_max127(&self, acc: i32, min: i32) -> i8 {
        self.scale_sat8(acc).max(min) as i8
    }

    /// `requantize(acc, m, shift, offset, min, max)`.
    #[inline(always)]
    pub fn apply(&self, acc: i32, min: i32, max: i32) -> i8 {
        self.scale_sat8(acc).max(min).min(max) as i8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::Rng;
    use proptest::prelude::*;

    fn check(acc: i32, m: i32, s: i32, off: i32, lo: i8, hi: i8) {
        assert_eq!(
            ChannelRequant::new(m, s, off, lo, hi).scale(acc),
            multiply_by_quantized_multiplier(acc, m, s),
            "MBQM acc {acc} m {m} shift {s}"
        );
        if m != i32::MIN {
            assert_eq!(
                ChannelRequant::new(m, s, off, lo, hi).apply_no_min(acc),
                requantize(acc, m, s, off, lo, hi)
            );
            assert_eq!(
                ChannelRequant::new(m, s, off, lo, 127).apply_no_min_max127(acc),
                requantize(acc, m, s, off, lo, 127)
            );
        }
        if let Some(f) = FoldedRequant::new(m, s, off) {
            assert_eq!(
                f.apply(acc, lo as i32, hi as i32),
                requantize(acc, m, s, off, lo, hi),
                "folded: acc {acc} m {m} shift {s} offset {off} [{lo}, {hi}]"
            );
            assert_eq!(
                f.apply_max127(acc, lo as i32),
                requantize(acc, m, s, off, lo, 127)
            );
        }
        assert_eq!(
            ChannelRequant::new(m, s, off, lo, hi).apply(acc),
            requantize(acc, m, s, off, lo, hi),
            "acc {acc} m {m} shift {s} offset {off} [{lo}, {hi}]"
        );
    }

    #[test]
    fn extremes_match_reference() {
        let accs = [
            0,
            1,
            -1,
            2,
            -2,
            i32::MAX,
            i32::MIN,
            1 << 30,
            -(1 << 30),
            12345,
            -12345,
        ];
        let mults = [
            0,
            1,
            -1,
            1 << 30,
            i32::MAX,
            i32::MIN,
            i32::MIN + 1,
            (1 << 30) + 777,
        ];
        for s in -31..=30 {
            for &a in &accs {
                for &m in &mults {
                    for &(off, lo, hi) in &[(0, -128, 127), (-128, -128, 127), (127, 5, 100)] {
                        check(a, m, s, off, lo, hi);
                    }
                }
            }
        }
    }

    #[test]
    fn folded_domain_edges() {
        assert!(FoldedRequant::new(1 << 30, -5, 0).is_none());
        assert!(FoldedRequant::new((1 << 30) + 1, 0, 0).is_none());
        assert!(FoldedRequant::new((1 << 30) + 1, -22, 0).is_none());
        for s in -21..=-1 {
            for m in [(1 << 30) + 1, i32::MAX, 1_500_000_000] {
                for acc in [
                    i32::MIN,
                    i32::MIN + 1,
                    -(1 << 30) - 1,
                    -(1 << 30),
                    (1 << 30) - 1,
                    1 << 30,
                    i32::MAX,
                    -1,
                    0,
                    1,
                ] {
                    for off in [-128, 0, 127] {
                        check(acc, m, s, off, -128, 127);
                        check(acc, m, s, off, -3, 100);
                    }
                }
            }
        }
    }

    #[test]
    fn scale_small_matches_reference() {
        let mut r = Rng(5);
        for s in -31..=-1 {
            for m in [(1 << 30) + 1, i32::MAX, 1_500_000_000] {
                for x in [
                    0,
                    1,
                    -1,
                    (1 << 30) - 1,
                    -(1 << 30) + 1,
                    255 << 20,
                    -255 << 20,
                ] {
                    let f = FoldedRequant::unsat(m, s).unwrap();
                    assert_eq!(f.scale_small(x), multiply_by_quantized_multiplier(x, m, s));
                }
            }
            for _ in 0..2000 {
                let m = (1 << 30) + 1 + (r.next_u64() % ((1u64 << 30) - 1)) as i32;
                let x = (r.next_u64() as i32 >> 2) & !((1i32 << (r.next_u64() % 24)) - 1);
                let x = x >> (r.next_u64() % 30);
                let f = FoldedRequant::unsat(m, s).unwrap();
                assert_eq!(
                    f.scale_small(x),
                    multiply_by_quantized_multiplier(x, m, s),
                    "x {x} m {m} s {s}"
                );
            }
        }
        assert!(FoldedRequant::unsat(1 << 30, -3).is_none());
        assert!(FoldedRequant::unsat((1 << 30) + 1, 0).is_none());
    }

    #[test]
    fn ties_match_reference() {
        // Exact halves after each rounding step, both signs.
        for s in -12..=0 {
            for k in -40..=40 {
                let acc = (k << 12) + (1 << 11);
                check(acc, 1 << 30, s, 0, -128, 127);
                check(-acc, 1 << 30, s, 3, -128, 127);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20000))]
        #[test]
        fn random_match_reference(seed in any::<u64>(), s in -31i32..=30) {
            let mut r = Rng(seed);
            let acc = r.next_u64() as i32 >> (r.next_u64() % 32);
            let m = r.next_u64() as i32;
            let off = r.range_i32(-128, 127);
            let (a, b) = (r.range_i32(-128, 127) as i8, r.range_i32(-128, 127) as i8);
            check(acc, m, s, off, a.min(b), a.max(b));
        }

        #[test]
        fn folded_match_reference(seed in any::<u64>(), s in -21i32..=-1) {
            // The folded path's domain: multiplier in (2^30, 2^31), large and
            // small accumulators, exact ties (acc a multiple of a power of 2).
            let mut r = Rng(seed);
            let m = (1 << 30) + 1 + (r.next_u64() % ((1u64 << 30) - 1)) as i32;
            let acc = (r.next_u64() as i32 >> (r.next_u64() % 32)) & !((1i32 << (r.next_u64() % 24)) - 1);
            let off = r.range_i32(-128, 127);
            let (a, b) = (r.range_i32(-128, 127) as i8, r.range_i32(-128, 127) as i8);
            prop_assert!(FoldedRequant::accepts(m, s));
            check(acc, m, s, off, a.min(b), a.max(b));
        }

    }
}
