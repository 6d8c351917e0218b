//! `maxpool_s8` and `avgpool_s8`: window pooling on NHWC int8 tensors.
//!
//! Pooling keeps the input's quantization (scale and zero point), as TFLM
//! requires, so there is no requantization: only the fused clamp.

use super::{window_out, Dims};
use crate::error::{check_len, check_param, Error};

/// Window geometry and fused clamp of a pooling op.
///
/// Padding is symmetric and padded positions are ignored (they are neither a
/// maximum candidate nor counted in an average), as in TFLM and PyTorch's
/// `MaxPool2d`. The output size is `(in + 2 * pad - kernel) / stride + 1`.
/// A global average pool is `kernel = (h, w)`, stride 1, no padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PoolParams {
    /// Window rows, ≥ 1.
    pub kernel_h: usize,
    /// Window columns, ≥ 1.
    pub kernel_w: usize,
    /// Vertical stride, ≥ 1.
    pub stride_h: usize,
    /// Horizontal stride, ≥ 1.
    pub stride_w: usize,
    /// Rows of padding on each side, `< kernel_h` (so no window is empty).
    pub pad_h: usize,
    /// Columns of padding on each side, `< kernel_w`.
    pub pad_w: usize,
    /// Lower clamp of the output.
    pub act_min: i8,
    /// Upper clamp of the output.
    pub act_max: i8,
}

impl PoolParams {
    /// The ResNet stem pool: 3x3, stride 2, padding 1, no clamp.
    pub const MAX_3X3_S2_P1: Self = Self {
        kernel_h: 3,
        kernel_w: 3,
        stride_h: 2,
        stride_w: 2,
        pad_h: 1,
        pad_w: 1,
        act_min: i8::MIN,
        act_max: i8::MAX,
    };

    /// A global pool over an `h x w` input.
    pub const fn global(h: usize, w: usize) -> Self {
        Self {
            kernel_h: h,
            kernel_w: w,
            stride_h: 1,
            stride_w: 1,
            pad_h: 0,
            pad_w: 0,
            act_min: i8::MIN,
            act_max: i8::MAX,
        }
    }

    /// The output dimensions for `input`, or `None` if the window does not fit.
    pub const fn output_dims(&self, input: Dims) -> Option<Dims> {
        match (
            window_out(input.h, self.kernel_h, self.stride_h, self.pad_h),
            window_out(input.w, self.kernel_w, self.stride_w, self.pad_w),
        ) {
            (Some(h), Some(w)) => Some(Dims::new(h, w, input.c)),
            _ => None,
        }
    }

    /// Everything the pooling kernels check except the buffers: parameter
    /// ranges and that `output_dims` follows from `input_dims`.
    pub fn validate_dims(&self, input_dims: Dims, output_dims: Dims) -> Result<(), Error> {
        check_param("kernel", self.kernel_h > 0 && self.kernel_w > 0)?;
        check_param("stride", self.stride_h > 0 && self.stride_w > 0)?;
        check_param(
            "padding",
            self.pad_h < self.kernel_h && self.pad_w < self.kernel_w,
        )?;
        check_param("act_min", self.act_min <= self.act_max)?;
        check_param("input_dims", !input_dims.is_empty())?;
        let expected = self
            .output_dims(input_dims)
            .ok_or(Error::Parameter { name: "kernel" })?;
        if expected != output_dims {
            return Err(Error::OutputDims {
                expected: expected.to_array(),
                actual: output_dims.to_array(),
            });
        }
        Ok(())
    }

    fn validate(
        &self,
        input: &[i8],
        input_dims: Dims,
        output: &[i8],
        output_dims: Dims,
    ) -> Result<(), Error> {
        self.validate_dims(input_dims, output_dims)?;
        check_len("input", input_dims.len(), input.len())?;
        check_len("output", output_dims.len(), output.len())
    }

    /// The in-bounds input range `[start, end)` of window `o` along one axis.
    #[inline(always)]
    fn span(o: usize, stride: usize, pad: usize, kernel: usize, size: usize) -> (usize, usize) {
        let start = o * stride;
        let lo = start.saturating_sub(pad);
        let hi = (start + kernel - pad).min(size);
        (lo, hi)
    }
}

/// Max pooling. Each output is the maximum of the in-bounds input values in
/// its window, clamped to `[act_min, act_max]`. No scratch.
///
/// With a channel count that is a multiple of 4 this runs the fast kernel
/// (`kernels::dsp`: four channels per word, SSUB8 + SEL); it gives the same
/// bytes as [`maxpool_s8_reference`].
pub fn maxpool_s8(
    params: &PoolParams,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
) -> Result<(), Error> {
    params.validate(input, input_dims, output, output_dims)?;
    if !super::dsp::pool::maxpool_s8_dsp(params, input, input_dims, output, output_dims) {
        maxpool_unchecked(params, input, input_dims, output, output_dims);
    }
    Ok(())
}

/// The portable reference of [`maxpool_s8`] (same contract, same bytes).
pub fn maxpool_s8_reference(
    params: &PoolParams,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
) -> Result<(), Error> {
    params.validate(input, input_dims, output, output_dims)?;
    maxpool_unchecked(params, input, input_dims, output, output_dims);
    Ok(())
}

fn maxpool_unchecked(
    params: &PoolParams,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
) {
    let c = input_dims.c;
    for oy in 0..output_dims.h {
        let (y0, y1) = PoolParams::span(
            oy,
            params.stride_h,
            params.pad_h,
            params.kernel_h,
            input_dims.h,
        );
        for ox in 0..output_dims.w {
            let (x0, x1) = PoolParams::span(
                ox,
                params.stride_w,
                params.pad_w,
                params.kernel_w,
                input_dims.w,
            );
            let out = &mut output[(oy * output_dims.w + ox) * c..(oy * output_dims.w + ox + 1) * c];
            out.fill(i8::MIN);
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let src =
                        &input[(iy * input_dims.w + ix) * c..(iy * input_dims.w + ix + 1) * c];
                    for (o, &v) in out.iter_mut().zip(src) {
                        *o = (*o).max(v);
                    }
                }
            }
            for o in out.iter_mut() {
                *o = (*o).clamp(params.act_min, params.act_max);
            }
        }
    }
}

/// Average pooling with TFLM's rounding: the sum of the in-bounds values is
/// divided by their count, rounding half away from zero, then clamped to
/// `[act_min, act_max]`. No scratch. The int32 sum limits a window to
/// 16 million elements.
pub fn avgpool_s8(
    params: &PoolParams,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
) -> Result<(), Error> {
    params.validate(input, input_dims, output, output_dims)?;
    check_param("kernel", params.kernel_h * params.kernel_w <= 1 << 24)?;
    let c = input_dims.c;
    for oy in 0..output_dims.h {
        let (y0, y1) = PoolParams::span(
            oy,
            params.stride_h,
            params.pad_h,
            params.kernel_h,
            input_dims.h,
        );
        for ox in 0..output_dims.w {
            let (x0, x1) = PoolParams::span(
                ox,
                params.stride_w,
                params.pad_w,
                params.kernel_w,
                input_dims.w,
            );
            let count = ((y1 - y0) * (x1 - x0)) as i32;
            let out = &mut output[(oy * output_dims.w + ox) * c..(oy * output_dims.w + ox + 1) * c];
            for (ch, o) in out.iter_mut().enumerate() {
                let mut acc: i32 = 0;
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        acc += input[(iy * input_dims.w + ix) * c + ch] as i32;
                    }
                }
                let avg = if acc > 0 {
                    (acc + count / 2) / count
                } else {
                    (acc - count / 2) / count
                };
                *o = avg.clamp(params.act_min as i32, params.act_max as i32) as i8;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::Rng;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// Window values from the definition: every (ky, kx) tap, skipping those
    /// outside the input.
    fn windows(input: &[i8], id: Dims, p: &PoolParams, od: Dims) -> Vec<Vec<Vec<i64>>> {
        let mut all = Vec::new();
        for oy in 0..od.h {
            for ox in 0..od.w {
                let mut per_c = vec![Vec::new(); id.c];
                for ky in 0..p.kernel_h {
                    for kx in 0..p.kernel_w {
                        let iy = (oy * p.stride_h + ky) as i64 - p.pad_h as i64;
                        let ix = (ox * p.stride_w + kx) as i64 - p.pad_w as i64;
                        if iy >= 0 && ix >= 0 && iy < id.h as i64 && ix < id.w as i64 {
                            for (ch, v) in per_c.iter_mut().enumerate() {
                                v.push(
                                    input[(iy as usize * id.w + ix as usize) * id.c + ch] as i64,
                                );
                            }
                        }
                    }
                }
                all.push(per_c);
            }
        }
        all
    }

    fn ref_max(input: &[i8], id: Dims, p: &PoolParams, od: Dims) -> Vec<i8> {
        windows(input, id, p, od)
            .into_iter()
            .flatten()
            .map(|w| (*w.iter().max().unwrap()).clamp(p.act_min as i64, p.act_max as i64) as i8)
            .collect()
    }

    /// Average rounded half away from zero, computed in f64 (exact here).
    fn ref_avg(input: &[i8], id: Dims, p: &PoolParams, od: Dims) -> Vec<i8> {
        windows(input, id, p, od)
            .into_iter()
            .flatten()
            .map(|w| {
                let mean = w.iter().sum::<i64>() as f64 / w.len() as f64;
                (mean.round() as i64).clamp(p.act_min as i64, p.act_max as i64) as i8
            })
            .collect()
    }

    type PoolFn = fn(&PoolParams, &[i8], Dims, &mut [i8], Dims) -> Result<(), Error>;

    fn run(f: PoolFn, p: &PoolParams, input: &[i8], id: Dims) -> Vec<i8> {
        let od = p.output_dims(id).unwrap();
        let mut out = vec![0x55i8; od.len()];
        f(p, input, id, &mut out, od).unwrap();
        out
    }

    #[test]
    fn hand_maxpool_3x3_s2_p1() {
        // 4x4 ramp, one channel: windows are rows/cols {0,1}, {1,2,3}.
        let input: Vec<i8> = (0..16).map(|v| v as i8 - 8).collect();
        let out = run(
            maxpool_s8,
            &PoolParams::MAX_3X3_S2_P1,
            &input,
            Dims::new(4, 4, 1),
        );
        assert_eq!(out, vec![-3, -1, 5, 7]);
        // All -128 stays -128 (padding is not a candidate).
        let out = run(
            maxpool_s8,
            &PoolParams::MAX_3X3_S2_P1,
            &[-128; 18],
            Dims::new(3, 3, 2),
        );
        assert_eq!(out, vec![-128; 8]);
    }

    #[test]
    fn hand_avgpool_rounding() {
        // TFLM rounds half away from zero: 1.5 → 2, -1.5 → -2, -0.5 → -1, 2.25 → 2.
        let g = PoolParams::global(2, 1);
        assert_eq!(run(avgpool_s8, &g, &[1, 2], Dims::new(2, 1, 1)), vec![2]);
        assert_eq!(run(avgpool_s8, &g, &[-1, -2], Dims::new(2, 1, 1)), vec![-2]);
        assert_eq!(run(avgpool_s8, &g, &[0, -1], Dims::new(2, 1, 1)), vec![-1]);
        let g = PoolParams::global(2, 2);
        assert_eq!(
            run(avgpool_s8, &g, &[2, 2, 2, 3], Dims::new(2, 2, 1)),
            vec![2]
        );
        assert_eq!(
            run(avgpool_s8, &g, &[127; 4], Dims::new(2, 2, 1)),
            vec![127]
        );
        assert_eq!(
            run(avgpool_s8, &g, &[-128; 4], Dims::new(2, 2, 1)),
            vec![-128]
        );
    }

    #[test]
    fn global_avgpool_of_stage4_shape() {
        let mut rng = Rng(5);
        let id = Dims::new(2, 2, 128);
        let input = rng.i8s(id.len());
        let p = PoolParams::global(2, 2);
        assert_eq!(
            run(avgpool_s8, &p, &input, id),
            ref_avg(&input, id, &p, p.output_dims(id).unwrap())
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        let p = PoolParams::MAX_3X3_S2_P1;
        let mut out = [0i8; 4];
        assert_eq!(
            maxpool_s8(
                &p,
                &[0; 15],
                Dims::new(4, 4, 1),
                &mut out,
                Dims::new(2, 2, 1)
            ),
            Err(Error::BufferLength {
                buffer: "input",
                expected: 16,
                actual: 15
            })
        );
        assert!(matches!(
            maxpool_s8(
                &p,
                &[0; 16],
                Dims::new(4, 4, 1),
                &mut out,
                Dims::new(4, 1, 1)
            ),
            Err(Error::OutputDims { .. })
        ));
        let bad = PoolParams { pad_h: 3, ..p };
        assert_eq!(
            avgpool_s8(
                &bad,
                &[0; 16],
                Dims::new(4, 4, 1),
                &mut out,
                Dims::new(2, 2, 1)
            ),
            Err(Error::Parameter { name: "padding" })
        );
        let bad = PoolParams {
            act_min: 5,
            act_max: 4,
            ..p
        };
        assert_eq!(
            maxpool_s8(
                &bad,
                &[0; 16],
                Dims::new(4, 4, 1),
                &mut out,
                Dims::new(2, 2, 1)
            ),
            Err(Error::Parameter { name: "act_min" })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn pools_match_reference(
            seed in any::<u64>(),
            h in 1usize..=10, w in 1usize..=10, c in 1usize..=12,
            kh in 1usize..=4, kw in 1usize..=4, sh in 1usize..=3, sw in 1usize..=3,
            ph in 0usize..4, pw in 0usize..4, lo in -128i32..=127, hi in -128i32..=127,
        ) {
            let (ph, pw) = (ph % kh, pw % kw);
            prop_assume!(h + 2 * ph >= kh && w + 2 * pw >= kw);
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
            let mut rng = Rng(seed);
            let clamp = rng.coin();
            let p = PoolParams {
                kernel_h: kh, kernel_w: kw, stride_h: sh, stride_w: sw, pad_h: ph, pad_w: pw,
                act_min: if clamp { lo as i8 } else { -128 },
                act_max: if clamp { hi as i8 } else { 127 },
            };
            let id = Dims::new(h, w, c);
            let input = rng.i8s(id.len());
            let od = p.output_dims(id).unwrap();
            prop_assert_eq!(run(maxpool_s8, &p, &input, id), ref_max(&input, id, &p, od));
            prop_assert_eq!(run(maxpool_s8_reference, &p, &input, id), ref_max(&input, id, &p, od));
            prop_assert_eq!(run(avgpool_s8, &p, &input, id), ref_avg(&input, id, &p, od));
        }
    }
}
