//! `conv2d_add_s8`: the second conv of a residual block and the add that
//! consumes its output, in one pass. The conv's int8 output is computed as
//! [`conv2d_s8`] computes it and goes straight into [`add_s8`]'s arithmetic,
//! so the bytes are those of the two kernels run apart; the conv's output
//! tensor is never stored (one store and one load per element fewer, and
//! no separate pass over the tensor).
//!
//! [`conv2d_s8`]: crate::kernels::conv2d_s8
//! [`add_s8`]: crate::kernels::add_s8

use core::ops::Range;

use super::{conv2d_s8_scratch_len, conv2d_s8_validate, AddParams, Conv2d, Dims};
use crate::error::{check_param, Error};

/// Which input of the add the conv's output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AddInput {
    /// `input1` of [`AddParams`]; the shortcut is `input2`.
    First,
    /// `input2`; the shortcut is `input1`.
    Second,
}

/// Where the tensors of a fused conv + add lie in one activation arena
/// (byte offsets, NHWC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedTensors {
    /// The conv's input.
    pub input: usize,
    /// Its dimensions.
    pub input_dims: Dims,
    /// The add's other input (the shortcut), `output_dims` like the output.
    pub shortcut: usize,
    /// The add's output.
    pub output: usize,
    /// The conv's (and the add's) output dimensions.
    pub output_dims: Dims,
}

fn range(at: usize, len: usize, arena: usize, name: &'static str) -> Result<Range<usize>, Error> {
    match at.checked_add(len) {
        Some(end) if end <= arena => Ok(at..end),
        _ => Err(Error::BufferLength {
            buffer: name,
            expected: at.saturating_add(len),
            actual: arena,
        }),
    }
}

/// Runs `conv` then `add` of its output with the shortcut, in one pass when
/// the fast kernel's fused path applies, writing only the add's output.
///
/// The conv's input is read completely before the output is written, so
/// `output` may overlap `input`; it must not overlap `shortcut`.
///
/// Returns `Ok(true)` when done, `Ok(false)` (nothing read or written) when
/// the fused path does not apply to these layers and this scratch (see
/// `kernels::dsp`: the widened-input lean conv with no clamp, an add whose
/// requantization the fast path folds); the caller then runs [`conv2d_s8`]
/// into an intermediate tensor and [`add_s8`], which give the same bytes.
///
/// [`conv2d_s8`]: crate::kernels::conv2d_s8
/// [`add_s8`]: crate::kernels::add_s8
pub fn conv2d_add_s8(
    conv: &Conv2d<'_>,
    add: &AddParams,
    conv_input: AddInput,
    arena: &mut [i8],
    t: &FusedTensors,
    scratch: &mut [i16],
) -> Result<bool, Error> {
    conv2d_s8_validate(conv, t.input_dims, t.output_dims)?;
    add.validate()?;
    let need = conv2d_s8_scratch_len(&conv.params, t.input_dims.c);
    if scratch.len() < need {
        return Err(Error::BufferLength {
            buffer: "scratch",
            expected: need,
            actual: scratch.len(),
        });
    }
    let n = arena.len();
    let len = t.output_dims.len();
    range(t.input, t.input_dims.len(), n, "input")?;
    let short = range(t.shortcut, len, n, "shortcut")?;
    let out = range(t.output, len, n, "output")?;
    check_param("shortcut", short.end <= out.start || out.end <= short.start)?;
    let base = arena.as_mut_ptr();
    // SAFETY: the three ranges are inside `arena` (checked above), the
    // shortcut and the output do not overlap, the scratch is a separate
    // buffer, and both layers are validated. The kernel reads the whole
    // input before it writes the output.
    let done = unsafe {
        super::dsp::conv::conv2d_add_s8_dsp(
            conv,
            add,
            conv_input == AddInput::First,
            base.add(t.input),
            t.input_dims,
            base.add(t.shortcut),
            base.add(t.output),
            t.output_dims,
            scratch,
        )
    };
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::Rng;
    use crate::kernels::{
        add_s8_reference, conv2d_s8_fast_scratch_len, conv2d_s8_reference, Conv2dParams, Requant,
    };
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    struct Case {
        p: Conv2dParams,
        id: Dims,
        od: Dims,
        filter: Vec<i8>,
        bias: Vec<i32>,
        mult: Vec<i32>,
        shift: Vec<i32>,
        add: AddParams,
        which: AddInput,
    }

    impl Case {
        fn random(rng: &mut Rng, id: Dims, out_c: usize, k: usize, s: usize) -> Self {
            let p = Conv2dParams {
                kernel_h: k,
                kernel_w: k,
                stride_h: s,
                stride_w: s,
                pad_h: k / 2,
                pad_w: k / 2,
                input_offset: rng.range_i32(-127, 128),
                output_offset: rng.range_i32(-128, 127),
                act_min: -128,
                act_max: 127,
            };
            let od = p.output_dims(id, out_c).unwrap();
            let taps = k * k * id.c;
            let typical = 128.0 * 64.0 * (taps as f64).sqrt();
            let (mult, shift) = (0..out_c)
                .map(|_| {
                    // Never an exact power of two (a multiplier of 2^30,
                    // outside the folded requantization's domain).
                    let f = (rng.next() % 1000) as f64 / 250.0 + 0.1;
                    crate::quant::quantize_multiplier(f * 100.0 * 1.000_123_4 / typical)
                })
                .unzip();
            // Scales whose ADD output shift stays in the folded domain (-21..=-1).
            let scale = |rng: &mut Rng| 0.02 + (rng.next() % 1000) as f64 / 20_000.0;
            let zp = |rng: &mut Rng| rng.range_i32(-128, 127);
            let relu = rng.coin();
            // The output scale never an exact power of two times an input's
            // (an output multiplier of 2^30: not folded, tested apart).
            let (s1, s2, so) = (scale(rng), scale(rng), scale(rng) * 1.000_012_3);
            let (z1, z2, zo) = (zp(rng), zp(rng), zp(rng));
            let add = AddParams::from_scales((s1, z1), (s2, z2), (so, zo), relu);
            Case {
                p,
                id,
                od,
                filter: rng.i8s(out_c * taps),
                bias: (0..out_c).map(|_| rng.range_i32(-20_000, 20_000)).collect(),
                mult,
                shift,
                add,
                which: if rng.coin() {
                    AddInput::First
                } else {
                    AddInput::Second
                },
            }
        }

        fn conv(&self) -> Conv2d<'_> {
            Conv2d {
                params: self.p,
                filter: &self.filter,
                bias: &self.bias,
                requant: Requant {
                    multiplier: &self.mult,
                    shift: &self.shift,
                },
            }
        }

        /// The two reference kernels apart.
        fn reference(&self, input: &[i8], short: &[i8]) -> Vec<i8> {
            let mut mid = vec![0i8; self.od.len()];
            let mut scratch = vec![0i16; conv2d_s8_scratch_len(&self.p, self.id.c)];
            conv2d_s8_reference(
                &self.conv(),
                input,
                self.id,
                &mut mid,
                self.od,
                &mut scratch,
            )
            .unwrap();
            let mut out = vec![0i8; self.od.len()];
            match self.which {
                AddInput::First => add_s8_reference(&self.add, &mid, short, &mut out),
                AddInput::Second => add_s8_reference(&self.add, short, &mid, &mut out),
            }
            .unwrap();
            out
        }

        /// Runs the fused kernel with the output at `out_at` (overlapping
        /// the input or not) and checks it against the references; returns
        /// whether the fused path ran.
        fn check(&self, rng: &mut Rng, out_at: usize, scratch_len: usize) -> bool {
            let (il, ol) = (self.id.len(), self.od.len());
            let short_at = il.max(out_at + ol);
            let mut arena = rng.i8s(short_at + ol + 3);
            let input = arena[..il].to_vec();
            let short = arena[short_at..short_at + ol].to_vec();
            let want = self.reference(&input, &short);
            let before = arena.clone();
            let mut scratch = vec![0x5555i16; scratch_len];
            let t = FusedTensors {
                input: 0,
                input_dims: self.id,
                shortcut: short_at,
                output: out_at,
                output_dims: self.od,
            };
            let done = conv2d_add_s8(
                &self.conv(),
                &self.add,
                self.which,
                &mut arena,
                &t,
                &mut scratch,
            )
            .unwrap();
            if done {
                assert_eq!(
                    &arena[out_at..out_at + ol],
                    &want[..],
                    "{:?} {:?}",
                    self.p,
                    self.id
                );
                assert_eq!(
                    &arena[short_at..],
                    &before[short_at..],
                    "shortcut untouched"
                );
            } else {
                assert_eq!(arena, before, "nothing written when not fused");
            }
            done
        }
    }

    #[test]
    fn fused_matches_conv_then_add_and_may_overwrite_its_input() {
        // The residual blocks' second convs of Mini-ResNet and smaller
        // shapes: 2x2 (a block across rows), 3x5 (a short last block),
        // output at the input's place, overlapping it partly, and apart.
        let mut rng = Rng(5);
        let mut fused = 0;
        for &(h, w, c, out_c, k, s) in &[
            (16, 16, 16, 16, 3, 1),
            (8, 8, 32, 32, 3, 1),
            (4, 4, 64, 64, 3, 1),
            (2, 2, 128, 128, 3, 1),
            (3, 5, 16, 8, 3, 1),
            (6, 6, 16, 4, 3, 2),
            // The downsampling shortcuts (1x1, stride 2, no padding).
            (16, 16, 16, 32, 1, 2),
            (4, 4, 64, 128, 1, 2),
            (5, 3, 32, 8, 1, 2),
        ] {
            let id = Dims::new(h, w, c);
            for trial in 0..6 {
                let case = Case::random(&mut rng, id, out_c, k, s);
                let full = conv2d_s8_fast_scratch_len(&case.p, id);
                let out_at = match trial % 3 {
                    0 => 0,
                    1 => id.len() / 3,
                    _ => id.len(),
                };
                fused += case.check(&mut rng, out_at, full) as usize;
                // Too little scratch for the widened input: not fused.
                assert!(!case.check(&mut rng, out_at, full - 1));
            }
        }
        assert_eq!(fused, 54, "the fused path ran {fused} of 54 times");
    }

    #[test]
    fn falls_back_where_the_fused_path_does_not_apply() {
        let mut rng = Rng(8);
        let id = Dims::new(8, 8, 16);
        // A clamp on the conv, an add with an upper clamp or an output
        // multiplier outside the folded domain, channels not a multiple of
        // 4: each is left to the caller.
        let mut c = Case::random(&mut rng, id, 16, 3, 1);
        c.p.act_min = -100;
        assert!(!c.check(&mut rng, 0, 100_000));
        let mut c = Case::random(&mut rng, id, 16, 3, 1);
        c.add.act_max = 100;
        assert!(!c.check(&mut rng, 0, 100_000));
        let mut c = Case::random(&mut rng, id, 16, 3, 1);
        c.add.output_multiplier = 1 << 30;
        assert!(!c.check(&mut rng, 0, 100_000), "add multiplier 2^30");
        let c = Case::random(&mut rng, id, 16, 1, 1);
        assert!(c.check(&mut rng, 0, 100_000), "1x1 without padding fuses");
        let c = Case::random(&mut rng, Dims::new(8, 8, 6), 16, 1, 1);
        assert!(!c.check(&mut rng, 0, 100_000), "6 channels");
        // Channels outside the folded requantization's domain (a multiplier
        // of exactly 2^30, a shift below -21 as a nearly dead channel has):
        // up to one in 8 are recomputed after each block, more fall back.
        let mut c = Case::random(&mut rng, id, 16, 3, 1);
        c.mult[3] = 1 << 30;
        c.shift[15] = -24;
        assert!(c.check(&mut rng, 0, 100_000), "two outliers of 16");
        let mut c = Case::random(&mut rng, Dims::new(3, 5, 16), 16, 3, 1);
        c.shift[0] = -24;
        assert!(
            c.check(&mut rng, 0, 100_000),
            "an outlier, short last block"
        );
        let mut c = Case::random(&mut rng, id, 16, 3, 1);
        c.shift[0] = -24;
        c.shift[5] = -25;
        c.mult[9] = 1 << 30;
        assert!(!c.check(&mut rng, 0, 100_000), "three outliers of 16");
    }

    #[test]
    fn rejects_bad_arguments() {
        let mut rng = Rng(9);
        let id = Dims::new(4, 4, 16);
        let c = Case::random(&mut rng, id, 16, 3, 1);
        let mut scratch = vec![0i16; 10_000];
        let t = FusedTensors {
            input: 0,
            input_dims: id,
            shortcut: 256,
            output: 300,
            output_dims: c.od,
        };
        let mut arena = vec![0i8; 600];
        // The shortcut overlaps the output.
        assert_eq!(
            conv2d_add_s8(&c.conv(), &c.add, c.which, &mut arena, &t, &mut scratch),
            Err(Error::Parameter { name: "shortcut" })
        );
        // The output runs past the arena.
        let t2 = FusedTensors { output: 400, ..t };
        assert!(matches!(
            conv2d_add_s8(&c.conv(), &c.add, c.which, &mut arena, &t2, &mut scratch),
            Err(Error::BufferLength {
                buffer: "output",
                ..
            })
        ));
        // Too little scratch for even the reference kernel.
        let t3 = FusedTensors { output: 0, ..t };
        assert!(matches!(
            conv2d_add_s8(
                &c.conv(),
                &c.add,
                c.which,
                &mut arena,
                &t3,
                &mut scratch[..10]
            ),
            Err(Error::BufferLength {
                buffer: "scratch",
                ..
            })
        ));
        // Bad add parameters.
        let mut bad = c.add;
        bad.left_shift = 40;
        assert_eq!(
            conv2d_add_s8(&c.conv(), &bad, c.which, &mut arena, &t3, &mut scratch),
            Err(Error::Parameter { name: "left_shift" })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn fused_matches_references(
            seed in any::<u64>(),
            h in 1usize..=7, w in 1usize..=7, c4 in 1usize..=6, out_c in 1usize..=9,
            k in 1usize..=3, s in 1usize..=2, overlap in 0usize..3, outlier in 0usize..3,
        ) {
            // Taps a multiple of 16: 4 channels with a 2x2 kernel, else
            // multiples of 16 channels (1x1 kernels: no padding).
            let c = if k == 2 { 4 * c4 } else { 16 * c4.min(3) };
            let id = Dims::new(h, w, c);
            let mut rng = Rng(seed);
            let mut case = Case::random(&mut rng, id, out_c, k, s);
            // One channel outside the folded domain: fused (and recomputed)
            // from 8 channels on.
            match outlier {
                1 => case.shift[0] = -24,
                2 => case.mult[out_c - 1] = 1 << 30,
                _ => {}
            }
            let full = conv2d_s8_fast_scratch_len(&case.p, id);
            let out_at = [0, id.len() / 2, id.len()][overlap];
            prop_assert_eq!(case.check(&mut rng, out_at, full), outlier == 0 || out_c >= 8);
        }
    }
}
