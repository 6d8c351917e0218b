//! `add_s8`: elementwise addition of two int8 tensors (the residual add),
//! with TFLM's ADD arithmetic.

use crate::error::{check_len, check_param, Error};
use crate::quant::{multiply_by_quantized_multiplier, quantize_multiplier, MAX_SHIFT, MIN_SHIFT};

/// TFLM's int8 ADD parameters.
///
/// Each input is offset, shifted left by `left_shift` (20 in TFLM) for
/// headroom, scaled by its own multiplier to the common scale
/// `2 * max(scale1, scale2)`, the two are summed, and the sum is rescaled to
/// the output scale:
///
/// ```text
/// a   = MBQM((x1 + input1_offset) << left_shift, input1_multiplier, input1_shift)
/// b   = MBQM((x2 + input2_offset) << left_shift, input2_multiplier, input2_shift)
/// out = clamp(MBQM(a + b, output_multiplier, output_shift) + output_offset, act_min, act_max)
/// ```
///
/// TFLM's shifts here are all ≤ 0, where `MultiplyByQuantizedMultiplier`
/// and its `…SmallerThanOneExp` variant are the same function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AddParams {
    /// `-input1_zero_point`, in `-127..=128`.
    pub input1_offset: i32,
    /// Q31 multiplier of input 1.
    pub input1_multiplier: i32,
    /// Shift of input 1, in `-31..=30`.
    pub input1_shift: i32,
    /// `-input2_zero_point`, in `-127..=128`.
    pub input2_offset: i32,
    /// Q31 multiplier of input 2.
    pub input2_multiplier: i32,
    /// Shift of input 2, in `-31..=30`.
    pub input2_shift: i32,
    /// Headroom shift applied to both inputs, `0..=22` (TFLM uses 20).
    pub left_shift: i32,
    /// Q31 multiplier of the sum.
    pub output_multiplier: i32,
    /// Shift of the sum, in `-31..=30`.
    pub output_shift: i32,
    /// `output_zero_point`, in `-128..=127`.
    pub output_offset: i32,
    /// Lower clamp (the output zero point for a fused ReLU).
    pub act_min: i8,
    /// Upper clamp.
    pub act_max: i8,
}

impl AddParams {
    /// TFLM's `left_shift` for int8 ADD.
    pub const LEFT_SHIFT: i32 = 20;

    /// TFLM's ADD `Prepare`, from real scales and zero points (host side,
    /// uses `f64`). `relu` fuses a ReLU (`act_min` = output zero point).
    pub fn from_scales(
        (scale1, zp1): (f64, i32),
        (scale2, zp2): (f64, i32),
        (out_scale, out_zp): (f64, i32),
        relu: bool,
    ) -> Self {
        let twice_max = 2.0 * scale1.max(scale2);
        let (m1, s1) = quantize_multiplier(scale1 / twice_max);
        let (m2, s2) = quantize_multiplier(scale2 / twice_max);
        let (mo, so) =
            quantize_multiplier(twice_max / ((1u64 << Self::LEFT_SHIFT) as f64 * out_scale));
        Self {
            input1_offset: -zp1,
            input1_multiplier: m1,
            input1_shift: s1,
            input2_offset: -zp2,
            input2_multiplier: m2,
            input2_shift: s2,
            left_shift: Self::LEFT_SHIFT,
            output_multiplier: mo,
            output_shift: so,
            output_offset: out_zp,
            act_min: if relu {
                out_zp.clamp(-128, 127) as i8
            } else {
                i8::MIN
            },
            act_max: i8::MAX,
        }
    }

    /// The ten integers of the parameters in a fixed order (the model blob
    /// stores them so): `input1_offset, input1_multiplier, input1_shift,
    /// input2_offset, input2_multiplier, input2_shift, left_shift,
    /// output_multiplier, output_shift, output_offset`.
    pub const fn to_array(&self) -> [i32; 10] {
        [
            self.input1_offset,
            self.input1_multiplier,
            self.input1_shift,
            self.input2_offset,
            self.input2_multiplier,
            self.input2_shift,
            self.left_shift,
            self.output_multiplier,
            self.output_shift,
            self.output_offset,
        ]
    }

    /// The inverse of [`to_array`](Self::to_array), with the clamp.
    pub const fn from_array(p: [i32; 10], act_min: i8, act_max: i8) -> Self {
        Self {
            input1_offset: p[0],
            input1_multiplier: p[1],
            input1_shift: p[2],
            input2_offset: p[3],
            input2_multiplier: p[4],
            input2_shift: p[5],
            left_shift: p[6],
            output_multiplier: p[7],
            output_shift: p[8],
            output_offset: p[9],
            act_min,
            act_max,
        }
    }

    /// Checks every parameter is in its documented range.
    pub fn validate(&self) -> Result<(), Error> {
        check_param("input1_offset", (-127..=128).contains(&self.input1_offset))?;
        check_param("input2_offset", (-127..=128).contains(&self.input2_offset))?;
        check_param("output_offset", (-128..=127).contains(&self.output_offset))?;
        check_param("left_shift", (0..=22).contains(&self.left_shift))?;
        let shift_ok = |s: i32| (MIN_SHIFT..=MAX_SHIFT).contains(&s);
        check_param("input1_shift", shift_ok(self.input1_shift))?;
        check_param("input2_shift", shift_ok(self.input2_shift))?;
        check_param("output_shift", shift_ok(self.output_shift))?;
        check_param("act_min", self.act_min <= self.act_max)
    }

    /// One element of the add.
    #[inline(always)]
    pub fn add_one(&self, x1: i8, x2: i8) -> i8 {
        let a = (x1 as i32 + self.input1_offset) << self.left_shift;
        let b = (x2 as i32 + self.input2_offset) << self.left_shift;
        let a = multiply_by_quantized_multiplier(a, self.input1_multiplier, self.input1_shift);
        let b = multiply_by_quantized_multiplier(b, self.input2_multiplier, self.input2_shift);
        crate::quant::requantize(
            a.wrapping_add(b),
            self.output_multiplier,
            self.output_shift,
            self.output_offset,
            self.act_min,
            self.act_max,
        )
    }
}

/// Elementwise `output[i] = add(input1[i], input2[i])` with the arithmetic of
/// [`AddParams`]. All three slices have the same length (any layout, as long
/// as both inputs share it). No scratch.
///
/// The fast kernel (`kernels::dsp`: the input rescalings tabulated per int8
/// value); it gives the same bytes as [`add_s8_reference`].
pub fn add_s8(
    params: &AddParams,
    input1: &[i8],
    input2: &[i8],
    output: &mut [i8],
) -> Result<(), Error> {
    params.validate()?;
    check_len("input2", input1.len(), input2.len())?;
    check_len("output", input1.len(), output.len())?;
    super::dsp::add::add_s8_dsp(params, input1, input2, output);
    Ok(())
}

/// The portable reference of [`add_s8`] (same contract, same bytes): one
/// [`AddParams::add_one`] per element.
pub fn add_s8_reference(
    params: &AddParams,
    input1: &[i8],
    input2: &[i8],
    output: &mut [i8],
) -> Result<(), Error> {
    params.validate()?;
    check_len("input2", input1.len(), input2.len())?;
    check_len("output", input1.len(), output.len())?;
    for ((o, &a), &b) in output.iter_mut().zip(input1).zip(input2) {
        *o = params.add_one(a, b);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{ref_clamp, ref_requant, Rng};
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn ref_add(p: &AddParams, a: &[i8], b: &[i8]) -> Vec<i8> {
        a.iter()
            .zip(b)
            .map(|(&x1, &x2)| {
                let s1 = ref_requant(
                    (x1 as i64 + p.input1_offset as i64) * (1i64 << p.left_shift),
                    p.input1_multiplier,
                    p.input1_shift,
                );
                let s2 = ref_requant(
                    (x2 as i64 + p.input2_offset as i64) * (1i64 << p.left_shift),
                    p.input2_multiplier,
                    p.input2_shift,
                );
                let r = ref_requant(s1 + s2, p.output_multiplier, p.output_shift)
                    + p.output_offset as i64;
                ref_clamp(r, p.act_min, p.act_max)
            })
            .collect()
    }

    /// Every backend on the same data: they must agree byte for byte.
    fn run(p: &AddParams, a: &[i8], b: &[i8]) -> Vec<i8> {
        let mut out = vec![0i8; a.len()];
        add_s8(p, a, b, &mut out).unwrap();
        let mut reference = vec![0i8; a.len()];
        add_s8_reference(p, a, b, &mut reference).unwrap();
        assert_eq!(out, reference, "fast vs reference");
        let mut tables = vec![0i8; a.len()];
        crate::kernels::dsp::add::add_s8_tables(p, a, b, &mut tables);
        assert_eq!(tables, reference, "table path vs reference");
        out
    }

    #[test]
    fn from_scales_is_tflm_prepare() {
        // Equal scales: each input multiplier is 0.5 = (2^30, 0); output
        // multiplier 2 * s / (2^20 * s) = 2^-19 = (2^30, -18).
        let p = AddParams::from_scales((0.1, 0), (0.1, 0), (0.1, 0), false);
        assert_eq!((p.input1_multiplier, p.input1_shift), (1 << 30, 0));
        assert_eq!((p.input2_multiplier, p.input2_shift), (1 << 30, 0));
        assert_eq!((p.output_multiplier, p.output_shift), (1 << 30, -18));
        // Same scale everywhere means the add is exact integer addition.
        assert_eq!(
            run(&p, &[1, -3, 100, -100, 64], &[2, 5, 27, -28, 64]),
            vec![3, 2, 127, -128, 127]
        );
    }

    #[test]
    fn hand_zero_points_and_relu() {
        // in1: zp -10, in2: zp 20, out: zp 5, all scale 1, ReLU:
        // real = (x1 + 10) + (x2 - 20); out = real + 5, clamped below at 5.
        let p = AddParams::from_scales((1.0, -10), (1.0, 20), (1.0, 5), true);
        assert_eq!(run(&p, &[0, -10, 50], &[20, 0, 30]), vec![15, 5, 75]);
    }

    #[test]
    fn mixed_scales_match_reference() {
        let mut rng = Rng(9);
        for &(s1, s2, so) in &[
            (0.05, 0.02, 0.06),
            (0.02, 0.05, 0.01),
            (1.0, 1e-3, 0.5),
            (0.1, 0.1, 1.0),
            (3e-3, 0.7, 0.9),
        ] {
            for &(z1, z2, zo) in &[(0, 0, 0), (-128, 127, -128), (127, -128, 127), (17, -3, 64)] {
                for relu in [false, true] {
                    let p = AddParams::from_scales((s1, z1), (s2, z2), (so, zo), relu);
                    let a = rng.i8s(64);
                    let b = rng.i8s(64);
                    assert_eq!(run(&p, &a, &b), ref_add(&p, &a, &b), "{p:?}");
                    // An upper clamp below 127 as well.
                    let p = AddParams {
                        act_max: 100,
                        act_min: p.act_min.min(100),
                        ..p
                    };
                    assert_eq!(run(&p, &a, &b), ref_add(&p, &a, &b), "{p:?}");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let p = AddParams::from_scales((0.1, 0), (0.1, 0), (0.1, 0), false);
        let mut out = [0i8; 3];
        assert_eq!(
            add_s8(&p, &[0; 3], &[0; 2], &mut out),
            Err(Error::BufferLength {
                buffer: "input2",
                expected: 3,
                actual: 2
            })
        );
        assert_eq!(
            add_s8(
                &AddParams {
                    left_shift: 23,
                    ..p
                },
                &[0; 3],
                &[0; 3],
                &mut out
            ),
            Err(Error::Parameter { name: "left_shift" })
        );
        assert_eq!(
            add_s8(
                &AddParams {
                    output_shift: -32,
                    ..p
                },
                &[0; 3],
                &[0; 3],
                &mut out
            ),
            Err(Error::Parameter {
                name: "output_shift"
            })
        );
        assert_eq!(
            add_s8(
                &AddParams {
                    input1_offset: -128,
                    ..p
                },
                &[0; 3],
                &[0; 3],
                &mut out
            ),
            Err(Error::Parameter {
                name: "input1_offset"
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn matches_reference(
            seed in any::<u64>(), n in 1usize..40,
            s1 in 1e-3f64..1.0, s2 in 1e-3f64..1.0, so in 1e-3f64..2.0,
            z1 in -128i32..=127, z2 in -128i32..=127, zo in -128i32..=127, relu in any::<bool>(),
        ) {
            let p = AddParams::from_scales((s1, z1), (s2, z2), (so, zo), relu);
            let mut rng = Rng(seed);
            let a = rng.i8s(n);
            let b = rng.i8s(n);
            prop_assert_eq!(run(&p, &a, &b), ref_add(&p, &a, &b));
        }

        #[test]
        fn raw_parameters_match_reference(
            seed in any::<u64>(),
            m1 in any::<i32>(), m2 in any::<i32>(), mo in any::<i32>(),
            sh1 in -31i32..=0, sh2 in -31i32..=0, sho in -31i32..=0, ls in 0i32..=22,
            o1 in -127i32..=128, o2 in -127i32..=128, oo in -128i32..=127,
        ) {
            let p = AddParams {
                input1_offset: o1, input1_multiplier: m1, input1_shift: sh1,
                input2_offset: o2, input2_multiplier: m2, input2_shift: sh2,
                left_shift: ls, output_multiplier: mo, output_shift: sho, output_offset: oo,
                act_min: -128, act_max: 127,
            };
            let mut rng = Rng(seed);
            let a = rng.i8s(16);
            let b = rng.i8s(16);
            prop_assert_eq!(run(&p, &a, &b), ref_add(&p, &a, &b));
        }
    }
}
