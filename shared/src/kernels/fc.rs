//! `fc_s8`: fully connected (dense) layer, int8 in/out.

use super::{check_offsets, Requant};
use crate::error::{check_len, Error};
use crate::quant::requantize;

/// A fully connected layer with per-output requantization.
#[derive(Debug, Clone, Copy)]
pub struct FullyConnected<'a> {
    /// Weights `[out][in]`, row-major, symmetric (zero point 0).
    pub filter: &'a [i8],
    /// int32 bias per output, scale `input_scale * weight_scale[o]`.
    pub bias: &'a [i32],
    /// Per-output requantization (one entry per output).
    pub requant: Requant<'a>,
    /// `-input_zero_point`, in `-127..=128`.
    pub input_offset: i32,
    /// `output_zero_point`, in `-128..=127`.
    pub output_offset: i32,
    /// Lower clamp of the output.
    pub act_min: i8,
    /// Upper clamp of the output.
    pub act_max: i8,
}

impl FullyConnected<'_> {
    /// Everything [`fc_s8`] checks except the activation buffers, for an
    /// input of `n_in` values.
    pub fn validate(&self, n_in: usize) -> Result<(), Error> {
        check_offsets(
            self.input_offset,
            self.output_offset,
            self.act_min,
            self.act_max,
        )?;
        let n_out = self.bias.len();
        check_len("filter", n_out * n_in, self.filter.len())?;
        self.requant.validate(n_out)
    }
}

/// `output[o] = clamp(MBQM(bias[o] + Σ_i (input[i] + input_offset) * filter[o][i]) + output_offset)`.
///
/// `input` has `in` values, `output` has `out = bias.len()` values and
/// `filter` has `out * in`. No scratch.
pub fn fc_s8(layer: &FullyConnected<'_>, input: &[i8], output: &mut [i8]) -> Result<(), Error> {
    layer.validate(input.len())?;
    check_len("output", layer.bias.len(), output.len())?;
    let n_in = input.len();
    if n_in == 0 {
        // Degenerate but well defined: the output is the requantized bias.
        for (o, out) in output.iter_mut().enumerate() {
            *out = requantize(
                layer.bias[o],
                layer.requant.multiplier[o],
                layer.requant.shift[o],
                layer.output_offset,
                layer.act_min,
                layer.act_max,
            );
        }
        return Ok(());
    }
    for (o, (out, row)) in output
        .iter_mut()
        .zip(layer.filter.chunks_exact(n_in))
        .enumerate()
    {
        let mut acc = layer.bias[o];
        for (&w, &x) in row.iter().zip(input) {
            acc = acc.wrapping_add(w as i32 * (x as i32 + layer.input_offset));
        }
        *out = requantize(
            acc,
            layer.requant.multiplier[o],
            layer.requant.shift[o],
            layer.output_offset,
            layer.act_min,
            layer.act_max,
        );
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

    fn ref_fc(l: &FullyConnected<'_>, input: &[i8]) -> Vec<i8> {
        (0..l.bias.len())
            .map(|o| {
                let mut acc = l.bias[o] as i64;
                for (i, &x) in input.iter().enumerate() {
                    acc +=
                        (x as i64 + l.input_offset as i64) * l.filter[o * input.len() + i] as i64;
                }
                let r = ref_requant(acc, l.requant.multiplier[o], l.requant.shift[o])
                    + l.output_offset as i64;
                ref_clamp(r, l.act_min, l.act_max)
            })
            .collect()
    }

    #[test]
    fn hand_2x3() {
        // out0 = 1 + (1*1 + 2*2 + 3*3) = 15; out1 = -1 + (-1 - 2 - 3) = -7; scale 1.0 then +2.
        let l = FullyConnected {
            filter: &[1, 2, 3, -1, -1, -1],
            bias: &[1, -1],
            requant: Requant {
                multiplier: &[1 << 30, 1 << 30],
                shift: &[1, 1],
            },
            input_offset: 0,
            output_offset: 2,
            act_min: -128,
            act_max: 127,
        };
        let mut out = [0i8; 2];
        fc_s8(&l, &[1, 2, 3], &mut out).unwrap();
        assert_eq!(out, [17, -5]);
        // Input zero point 1 (offset -1): inputs become 0, 1, 2.
        let l = FullyConnected {
            input_offset: -1,
            ..l
        };
        fc_s8(&l, &[1, 2, 3], &mut out).unwrap();
        assert_eq!(out, [1 + 2 + 6 + 2, -1 - 3 + 2]);
    }

    #[test]
    fn rejects_bad_arguments() {
        let l = FullyConnected {
            filter: &[1, 2, 3],
            bias: &[0],
            requant: Requant {
                multiplier: &[1 << 30],
                shift: &[0],
            },
            input_offset: 0,
            output_offset: 0,
            act_min: -128,
            act_max: 127,
        };
        let mut out = [0i8; 1];
        assert_eq!(
            fc_s8(&l, &[1, 2], &mut out),
            Err(Error::BufferLength {
                buffer: "filter",
                expected: 2,
                actual: 3
            })
        );
        assert_eq!(
            fc_s8(&l, &[1, 2, 3], &mut [0i8; 2]),
            Err(Error::BufferLength {
                buffer: "output",
                expected: 1,
                actual: 2
            })
        );
        let bad = FullyConnected {
            output_offset: 128,
            ..l
        };
        assert_eq!(
            fc_s8(&bad, &[1, 2, 3], &mut out),
            Err(Error::Parameter {
                name: "output_offset"
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        #[test]
        fn matches_reference(
            seed in any::<u64>(), n_in in 1usize..=140, n_out in 1usize..=12,
            zi in -128i32..=127, zo in -128i32..=127, shift in -20i32..=2, relu in any::<bool>(),
        ) {
            let mut rng = Rng(seed);
            let filter = rng.i8s(n_in * n_out);
            let bias: Vec<i32> = (0..n_out).map(|_| rng.range_i32(-100_000, 100_000)).collect();
            let mult: Vec<i32> = (0..n_out).map(|_| rng.range_i32(1 << 30, i32::MAX)).collect();
            let shifts: Vec<i32> = (0..n_out).map(|_| shift - (rng.next_u64() % 4) as i32).collect();
            let l = FullyConnected {
                filter: &filter, bias: &bias,
                requant: Requant { multiplier: &mult, shift: &shifts },
                input_offset: -zi, output_offset: zo,
                act_min: if relu { zo as i8 } else { -128 }, act_max: 127,
            };
            let input = rng.i8s(n_in);
            let mut out = vec![0i8; n_out];
            fc_s8(&l, &input, &mut out).unwrap();
            prop_assert_eq!(out, ref_fc(&l, &input));
        }
    }
}
