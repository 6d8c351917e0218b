//! Fixed-point requantization: the authoritative definition of how every
//! int8 kernel rounds.
//!
//! Every int8 kernel turns its int32 accumulator back into int8 with the
//! arithmetic of [`multiply_by_quantized_multiplier`], which is TensorFlow
//! Lite Micro's default ("double rounding") arithmetic, taken from gemmlowp:
//!
//! 1. [`saturating_rounding_doubling_high_mul`]: `(a * b * 2) >> 32`, rounding
//!    to nearest with ties towards +infinity, saturating the single overflow
//!    case `i32::MIN * i32::MIN`;
//! 2. [`rounding_divide_by_pot`]: an arithmetic right shift that rounds to
//!    nearest with ties away from zero.
//!
//! A real multiplier `M` is represented as `M = multiplier * 2^(shift - 31)`
//! with `multiplier` in `[2^30, 2^31)` (or 0) and `shift` in `[-31, 30]`.
//! [`quantize_multiplier`] computes that pair from an `f64`; it is meant for
//! the host (trainer/exporter) and is the only function here that touches
//! floating point. Kernels never do.
//!
//! **Two implementations, one authority.** The reference kernels
//! (`conv2d_s8_reference`, `fc_s8`, `add_s8_reference`, …) call these
//! functions. The Cortex-M7 fast paths use
//! [`kernels::dsp::requant`](crate::kernels::dsp::requant) instead, which
//! re-derives the same arithmetic in faster forms: the per-channel work
//! hoisted out of the pixel loop (`ChannelRequant`) or the whole of it folded
//! into five DSP instructions (`FoldedRequant`, inlined into the kernels'
//! `asm!`). Calling these functions from there would put the per-channel
//! work back into every output, so the two stay separate: this module is
//! the specification, `dsp::requant` proves each rewrite equal in its docs,
//! falls back to this module outside the domain a rewrite covers, and is
//! tested bit for bit against [`requantize`] (unit cases, proptest, and on
//! the real instructions in the firmware's QEMU self-test). A change to the
//! rounding starts here, and then `dsp::requant` must follow.
//!
//! (Average pooling's division and the preprocessing's area mean round too;
//! they are not requantizations and are defined in their own modules.)

/// Smallest `shift` accepted by [`multiply_by_quantized_multiplier`].
pub const MIN_SHIFT: i32 = -31;
/// Largest `shift` accepted by [`multiply_by_quantized_multiplier`].
pub const MAX_SHIFT: i32 = 30;

/// gemmlowp `SaturatingRoundingDoublingHighMul`: returns the high 32 bits of
/// `2 * a * b`, rounded to nearest (ties towards +infinity).
///
/// The only product that does not fit, `i32::MIN * i32::MIN`, saturates to
/// `i32::MAX`.
#[inline(always)]
pub const fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // Rust's `/` truncates towards zero, as C's does.
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp `RoundingDivideByPOT`: `x / 2^exponent` rounded to nearest, ties
/// away from zero.
///
/// `exponent` must be in `0..=31`; other values are a caller bug (checked in
/// debug builds, masked to 5 bits in release so the function never panics).
#[inline(always)]
pub const fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    debug_assert!(exponent >= 0 && exponent <= 31);
    let e = (exponent as u32) & 31;
    let mask = ((1i64 << e) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + (x < 0) as i32;
    (x >> e) + (remainder > threshold) as i32
}

/// TFLM `MultiplyByQuantizedMultiplier` (default double-rounding build):
/// `x * multiplier * 2^(shift - 31)`, rounded as TFLM rounds it.
///
/// `shift` must lie in [`MIN_SHIFT`]`..=`[`MAX_SHIFT`]; kernels validate it
/// before they run. A positive `shift` multiplies `x` by `2^shift` first
/// (wrapping, like the C code, if the caller lets it overflow).
#[inline(always)]
pub const fn multiply_by_quantized_multiplier(x: i32, multiplier: i32, shift: i32) -> i32 {
    debug_assert!(shift >= MIN_SHIFT && shift <= MAX_SHIFT);
    let left_shift = if shift > 0 { shift } else { 0 };
    let right_shift = if shift > 0 { 0 } else { -shift };
    rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(x.wrapping_shl(left_shift as u32), multiplier),
        right_shift,
    )
}

/// Clamps `x` to `[min, max]` and narrows it to `i8` (the fused activation of
/// every kernel; `min`/`max` are already int8 values).
#[inline(always)]
pub const fn clamp_to_i8(x: i32, min: i8, max: i8) -> i8 {
    let lo = min as i32;
    let hi = max as i32;
    let y = if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    };
    y as i8
}

/// The output stage of every kernel: requantize an int32 accumulator, add
/// the output zero point and clamp to the fused activation range.
#[inline(always)]
pub const fn requantize(
    acc: i32,
    multiplier: i32,
    shift: i32,
    output_offset: i32,
    min: i8,
    max: i8,
) -> i8 {
    let scaled = multiply_by_quantized_multiplier(acc, multiplier, shift);
    clamp_to_i8(scaled.saturating_add(output_offset), min, max)
}

/// TFLM `QuantizeMultiplier`: splits a real multiplier into
/// `(quantized_multiplier, shift)` with
/// `real ≈ quantized_multiplier * 2^(shift - 31)`.
///
/// * `0.0` gives `(0, 0)`.
/// * The mantissa is rounded half away from zero (`std::round`); a mantissa
///   that rounds up to `2^31` rolls over to `2^30` with `shift + 1`.
/// * `shift < -31` would shift every bit out, so it becomes `(0, 0)`.
/// * `shift > 30` saturates to `(i32::MAX, 30)`, as TFLM does.
///
/// Negative multipliers keep their sign in `quantized_multiplier`. NaN and
/// infinities are not multipliers and give `(0, 0)`; the exporter rejects
/// them before it gets here.
pub fn quantize_multiplier(real: f64) -> (i32, i32) {
    if real == 0.0 || !real.is_finite() {
        return (0, 0);
    }
    let (q, mut shift) = frexp(real);
    let mut q_fixed = round_half_away_from_zero(q * (1u64 << 31) as f64);
    debug_assert!(q_fixed.abs() <= 1i64 << 31);
    if q_fixed.abs() == 1i64 << 31 {
        q_fixed /= 2;
        shift += 1;
    }
    if shift < MIN_SHIFT {
        return (0, 0);
    }
    if shift > MAX_SHIFT {
        return (if real > 0.0 { i32::MAX } else { -i32::MAX }, MAX_SHIFT);
    }
    (q_fixed as i32, shift)
}

/// C `frexp`: `x = m * 2^e` with `0.5 <= |m| < 1`, for finite non-zero `x`.
fn frexp(x: f64) -> (f64, i32) {
    let bits = x.to_bits();
    let exp_bits = ((bits >> 52) & 0x7ff) as i32;
    if exp_bits == 0 {
        // Subnormal: scale into the normal range first.
        let (m, e) = frexp(x * (1u64 << 54) as f64);
        return (m, e - 54);
    }
    let e = exp_bits - 1022;
    let m_bits = (bits & !(0x7ffu64 << 52)) | (1022u64 << 52);
    (f64::from_bits(m_bits), e)
}

/// `std::round` for values whose magnitude is below 2^52 (exact).
fn round_half_away_from_zero(x: f64) -> i64 {
    let t = x as i64; // truncates towards zero
    let frac = x - t as f64; // exact for |x| < 2^52
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Independent formulation of the first rounding: floor((2ab + 2^31) / 2^32),
    /// i.e. round to nearest with ties up, in i128.
    fn ref_srdhm(a: i32, b: i32) -> i32 {
        let v = ((a as i128 * b as i128 * 2) + (1i128 << 31)).div_euclid(1i128 << 32);
        v.clamp(i32::MIN as i128, i32::MAX as i128) as i32
    }

    /// Independent formulation of the second rounding: |x| / 2^e rounded
    /// half up, sign restored.
    fn ref_rdbpot(x: i32, e: i32) -> i32 {
        let mag = (x as i64).abs();
        let q = if e == 0 {
            mag
        } else {
            (mag + (1i64 << (e - 1))) >> e
        };
        (if x < 0 { -q } else { q }) as i32
    }

    fn ref_mbqm(x: i32, m: i32, shift: i32) -> i32 {
        let xs = if shift > 0 {
            x.wrapping_mul(1 << shift)
        } else {
            x
        };
        ref_rdbpot(ref_srdhm(xs, m), if shift > 0 { 0 } else { -shift })
    }

    #[test]
    fn srdhm_hand_cases() {
        // 0.5 * 0.5 = 0.25 in Q31.
        assert_eq!(
            saturating_rounding_doubling_high_mul(1 << 30, 1 << 30),
            1 << 29
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN),
            i32::MAX
        );
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MAX),
            -i32::MAX
        );
        // Ties: 2ab = 2^31 exactly is +0.5 → 1; -0.5 → 0.
        assert_eq!(saturating_rounding_doubling_high_mul(1 << 15, 1 << 15), 1);
        assert_eq!(
            saturating_rounding_doubling_high_mul(-(1 << 15), 1 << 15),
            0
        );
        assert_eq!(saturating_rounding_doubling_high_mul(-3 << 15, 1 << 15), -1);
        assert_eq!(saturating_rounding_doubling_high_mul(0, i32::MIN), 0);
    }

    #[test]
    fn rdbpot_hand_cases() {
        assert_eq!(rounding_divide_by_pot(5, 1), 3); // 2.5 → 3
        assert_eq!(rounding_divide_by_pot(-5, 1), -3); // -2.5 → -3
        assert_eq!(rounding_divide_by_pot(-1, 1), -1); // -0.5 → -1
        assert_eq!(rounding_divide_by_pot(7, 2), 2); // 1.75 → 2
        assert_eq!(rounding_divide_by_pot(-6, 2), -2); // -1.5 → -2
        assert_eq!(rounding_divide_by_pot(12345, 0), 12345);
        assert_eq!(rounding_divide_by_pot(i32::MIN, 31), -1);
        assert_eq!(rounding_divide_by_pot(i32::MAX, 31), 1);
        assert_eq!(rounding_divide_by_pot(i32::MAX, 30), 2);
        assert_eq!(rounding_divide_by_pot(-(1 << 30), 31), -1); // -0.5 → -1
        assert_eq!(rounding_divide_by_pot((1 << 30) - 1, 31), 0);
    }

    #[test]
    fn mbqm_every_shift_matches_reference() {
        let xs = [
            0,
            1,
            -1,
            127,
            -128,
            1000,
            -1000,
            65535,
            -65536,
            1 << 20,
            i32::MAX,
            i32::MIN,
            i32::MIN + 1,
        ];
        let ms = [
            0,
            1,
            1 << 30,
            (1 << 30) + 1,
            i32::MAX,
            i32::MAX - 1,
            1_518_500_250,
            -(1 << 30),
            i32::MIN,
        ];
        for shift in MIN_SHIFT..=MAX_SHIFT {
            for &x in &xs {
                for &m in &ms {
                    assert_eq!(
                        multiply_by_quantized_multiplier(x, m, shift),
                        ref_mbqm(x, m, shift),
                        "x={x} m={m} shift={shift}"
                    );
                }
            }
        }
    }

    #[test]
    fn quantize_multiplier_cases() {
        assert_eq!(quantize_multiplier(0.0), (0, 0));
        assert_eq!(quantize_multiplier(0.5), (1 << 30, 0));
        assert_eq!(quantize_multiplier(1.0), (1 << 30, 1));
        assert_eq!(quantize_multiplier(0.75), (3 << 29, 0));
        assert_eq!(quantize_multiplier(-0.5), (-(1 << 30), 0));
        assert_eq!(quantize_multiplier(2.0f64.powi(-10)), (1 << 30, -9));
        // Mantissa just below 1 rounds up to 2^31: rolls over to shift + 1.
        let just_below_one = 1.0 - 2.0f64.powi(-40);
        assert_eq!(quantize_multiplier(just_below_one), (1 << 30, 1));
        // Smallest kept exponent, and one below it: all bits shifted out → 0.
        assert_eq!(quantize_multiplier(2.0f64.powi(-32)), (1 << 30, -31));
        assert_eq!(quantize_multiplier(2.0f64.powi(-33)), (0, 0));
        assert_eq!(quantize_multiplier(f64::MIN_POSITIVE / 4.0), (0, 0));
        // Too large saturates.
        assert_eq!(quantize_multiplier(2.0f64.powi(31)), (i32::MAX, 30));
        assert_eq!(quantize_multiplier(2.0f64.powi(29)), (1 << 30, 30));
        assert_eq!(quantize_multiplier(f64::NAN), (0, 0));
    }

    #[test]
    fn frexp_matches_definition() {
        for &x in &[1.0, 0.5, 3.0, 1e-300, 5e-324, 1e300, -7.25, 0.1] {
            let (m, e) = frexp(x);
            assert!((0.5..1.0).contains(&m.abs()), "{x}: m={m}");
            assert_eq!(m * 2f64.powi(e / 2) * 2f64.powi(e - e / 2), x, "{x}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn mbqm_matches_reference(x in any::<i32>(), m in any::<i32>(), shift in MIN_SHIFT..=0) {
            prop_assert_eq!(multiply_by_quantized_multiplier(x, m, shift), ref_mbqm(x, m, shift));
        }

        #[test]
        fn mbqm_left_shift_matches_reference(
            x in -(1i32 << 16)..(1 << 16), m in (1i32 << 30)..i32::MAX, shift in 0..=14i32,
        ) {
            prop_assert_eq!(multiply_by_quantized_multiplier(x, m, shift), ref_mbqm(x, m, shift));
        }

        #[test]
        fn quantize_multiplier_is_accurate(real in 1e-9f64..1e3) {
            let (q, shift) = quantize_multiplier(real);
            prop_assert!((1 << 30..=i32::MAX).contains(&q));
            prop_assert!((MIN_SHIFT..=MAX_SHIFT).contains(&shift));
            let back = q as f64 * 2f64.powi(shift - 31);
            prop_assert!(((back - real) / real).abs() <= 2f64.powi(-31));
        }
    }
}
