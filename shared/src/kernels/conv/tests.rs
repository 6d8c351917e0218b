use super::*;
use crate::kernels::testutil::{ref_clamp, ref_requant, Rng};
use proptest::prelude::*;
use std::vec;
use std::vec::Vec;

/// Plain seven-loop convolution in i64, from the definition.
#[allow(clippy::too_many_arguments)]
fn ref_conv(
    input: &[i8],
    id: Dims,
    filter: &[i8],
    bias: &[i32],
    mult: &[i32],
    shift: &[i32],
    p: &Conv2dParams,
    od: Dims,
) -> Vec<i8> {
    let mut out = vec![0i8; od.len()];
    for oy in 0..od.h {
        for ox in 0..od.w {
            for oc in 0..od.c {
                let mut acc = bias[oc] as i64;
                for ky in 0..p.kernel_h {
                    for kx in 0..p.kernel_w {
                        let iy = (oy * p.stride_h + ky) as i64 - p.pad_h as i64;
                        let ix = (ox * p.stride_w + kx) as i64 - p.pad_w as i64;
                        if iy < 0 || ix < 0 || iy >= id.h as i64 || ix >= id.w as i64 {
                            continue;
                        }
                        for ic in 0..id.c {
                            let x = input[(iy as usize * id.w + ix as usize) * id.c + ic] as i64;
                            let w = filter[((oc * p.kernel_h + ky) * p.kernel_w + kx) * id.c + ic]
                                as i64;
                            acc += (x + p.input_offset as i64) * w;
                        }
                    }
                }
                let r = ref_requant(acc, mult[oc], shift[oc]) + p.output_offset as i64;
                out[(oy * od.w + ox) * od.c + oc] = ref_clamp(r, p.act_min, p.act_max);
            }
        }
    }
    out
}

struct Case {
    p: Conv2dParams,
    id: Dims,
    out_c: usize,
    input: Vec<i8>,
    filter: Vec<i8>,
    bias: Vec<i32>,
    mult: Vec<i32>,
    shift: Vec<i32>,
}

impl Case {
    fn layer(&self) -> Conv2d<'_> {
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

    fn run(&self) -> Vec<i8> {
        let od = self.p.output_dims(self.id, self.out_c).unwrap();
        let layer = self.layer();
        let mut out = vec![0i8; od.len()];
        let mut scratch = vec![0x5555i16; conv2d_s8_scratch_len(&self.p, self.id.c)];
        conv2d_s8(&layer, &self.input, self.id, &mut out, od, &mut scratch).unwrap();
        // The fast kernel's 1x4 tile, with room for four columns.
        let mut wide = vec![0i8; od.len()];
        let mut scratch4 = vec![0x5555i16; 2 * scratch.len() + 3];
        conv2d_s8(&layer, &self.input, self.id, &mut wide, od, &mut scratch4).unwrap();
        assert_eq!(wide, out, "1x4 tile vs 2x2 tile");
        // The widened input, where the layer takes it.
        let mut widened = vec![0i8; od.len()];
        let mut scratch_w = vec![0x5555i16; conv2d_s8_fast_scratch_len(&self.p, self.id)];
        conv2d_s8(
            &layer,
            &self.input,
            self.id,
            &mut widened,
            od,
            &mut scratch_w,
        )
        .unwrap();
        assert_eq!(widened, out, "widened input vs 2x2 tile");
        // A scratch at an odd i16 address: aligned by skipping one element
        // when there is room, else the portable path.
        let need = conv2d_s8_scratch_len(&self.p, self.id.c);
        for extra in [1, 0] {
            let mut odd = vec![0x5555i16; need + 2];
            let mut got = vec![0i8; od.len()];
            let s = &mut odd[1..1 + need + extra];
            conv2d_s8(&layer, &self.input, self.id, &mut got, od, s).unwrap();
            assert_eq!(got, out, "misaligned scratch, {extra} spare");
        }
        // Every backend, same bytes: the reference kernel too.
        let mut reference = vec![0i8; od.len()];
        scratch.fill(0x5555);
        conv2d_s8_reference(
            &layer,
            &self.input,
            self.id,
            &mut reference,
            od,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(out, reference, "fast vs reference kernel");
        out
    }

    fn check(&self) {
        let od = self.p.output_dims(self.id, self.out_c).unwrap();
        let want = ref_conv(
            &self.input,
            self.id,
            &self.filter,
            &self.bias,
            &self.mult,
            &self.shift,
            &self.p,
            od,
        );
        assert_eq!(self.run(), want, "params {:?} input {:?}", self.p, self.id);
    }

    /// A random case: data from `rng`, geometry as given.
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut Rng,
        id: Dims,
        out_c: usize,
        k: (usize, usize),
        s: (usize, usize),
        pad: (usize, usize),
        zp_in: i32,
        zp_out: i32,
    ) -> Self {
        let taps = k.0 * k.1 * id.c;
        let relu = rng.coin();
        let p = Conv2dParams {
            kernel_h: k.0,
            kernel_w: k.1,
            stride_h: s.0,
            stride_w: s.1,
            pad_h: pad.0,
            pad_w: pad.1,
            input_offset: -zp_in,
            output_offset: zp_out,
            act_min: if relu { zp_out as i8 } else { -128 },
            act_max: 127,
        };
        // Scale so outputs span the int8 range: acc magnitude ~ 128*127*sqrt(taps).
        let typical = 128.0 * 64.0 * (taps as f64).sqrt();
        let (mult, shift): (Vec<i32>, Vec<i32>) = (0..out_c)
            .map(|_| {
                let f = (rng.next_u64() % 1000) as f64 / 250.0 + 0.1;
                crate::quant::quantize_multiplier(f * 100.0 / typical)
            })
            .unzip();
        Case {
            p,
            id,
            out_c,
            input: rng.i8s(id.len()),
            filter: rng.i8s(out_c * taps),
            bias: (0..out_c).map(|_| rng.range_i32(-20_000, 20_000)).collect(),
            mult,
            shift,
        }
    }
}

fn unit(mult_1: bool) -> (Vec<i32>, Vec<i32>) {
    // 1.0 = 2^30 * 2^(1 - 31); 0.5 = 2^30 * 2^(0 - 31).
    (vec![1 << 30], vec![if mult_1 { 1 } else { 0 }])
}

fn params(k: usize, s: usize, pad: usize) -> Conv2dParams {
    Conv2dParams {
        kernel_h: k,
        kernel_w: k,
        stride_h: s,
        stride_w: s,
        pad_h: pad,
        pad_w: pad,
        input_offset: 0,
        output_offset: 0,
        act_min: -128,
        act_max: 127,
    }
}

#[test]
fn hand_1x1_half_rounds_tie_up() {
    // acc = 5 + 10 * 3 = 35; 35 * 0.5 = 17.5 → 18 (TFLM rounds this tie up).
    let (mult, shift) = unit(false);
    let c = Case {
        p: params(1, 1, 0),
        id: Dims::new(1, 1, 1),
        out_c: 1,
        input: vec![10],
        filter: vec![3],
        bias: vec![5],
        mult,
        shift,
    };
    assert_eq!(c.run(), vec![18]);
    // -35 * 0.5 = -17.5 → -17 after the first rounding (ties up), no second.
    let c = Case {
        bias: vec![-65],
        ..c
    };
    assert_eq!(c.run(), vec![-17]);
}

#[test]
fn hand_3x3_padding_counts_taps() {
    // All-ones input and kernel, pad 1: every output counts its in-bounds taps.
    let (mult, shift) = unit(true);
    let c = Case {
        p: params(3, 1, 1),
        id: Dims::new(3, 3, 1),
        out_c: 1,
        input: vec![1; 9],
        filter: vec![1; 9],
        bias: vec![0],
        mult,
        shift,
    };
    assert_eq!(c.run(), vec![4, 6, 4, 6, 9, 6, 4, 6, 4]);
    // Stride 2 on the same input picks the corners.
    let c = Case {
        p: params(3, 2, 1),
        ..c
    };
    assert_eq!(c.run(), vec![4, 4, 4, 4]);
}

#[test]
fn hand_zero_point_equals_padding() {
    // Input zero point -128 and every input at -128 (real zero): output is
    // the bias alone everywhere, borders included.
    let (mult, shift) = unit(true);
    let mut p = params(3, 1, 1);
    p.input_offset = 128;
    let c = Case {
        p,
        id: Dims::new(4, 5, 2),
        out_c: 1,
        input: vec![-128; 40],
        filter: vec![77; 18],
        bias: vec![-7],
        mult,
        shift,
    };
    assert_eq!(c.run(), vec![-7; 20]);
}

#[test]
fn hand_saturation_and_relu() {
    let (mult, shift) = unit(true);
    let mut p = params(1, 1, 0);
    p.output_offset = -5;
    p.act_min = -5; // fused ReLU at the output zero point
    let c = Case {
        p,
        id: Dims::new(1, 3, 1),
        out_c: 1,
        input: vec![127, -128, 1],
        filter: vec![127],
        bias: vec![0],
        mult,
        shift,
    };
    // 127*127-5 → 127; -128*127-5 → clamp -5; 127-5 = 122.
    assert_eq!(c.run(), vec![127, -5, 122]);
}

#[test]
fn edge_cases_match_reference() {
    let mut rng = Rng(7);
    // Channels not a multiple of 4, odd sizes with stride 2, every border,
    // extreme zero points, 1x1 stride-2 shortcuts and the stem shape.
    for &(h, w, cin, cout, k, s, pad) in &[
        (5, 7, 3, 5, 3, 2, 1),
        (7, 5, 1, 1, 3, 2, 1),
        (9, 9, 6, 7, 3, 2, 1),
        (8, 8, 16, 32, 1, 2, 0),
        (7, 7, 5, 3, 1, 2, 0),
        (32, 32, 3, 16, 3, 1, 1),
        (4, 4, 13, 2, 4, 1, 3),
        (3, 1, 2, 2, 3, 1, 2),
        (1, 1, 9, 4, 3, 1, 1),
        (6, 6, 4, 4, 2, 2, 1),
        // More than 256 taps with channels not a multiple of 4 (the
        // unpadded path with scalar tails), and taps < 4.
        (9, 9, 5, 3, 8, 1, 3),
        (3, 4, 3, 5, 1, 1, 0),
        (2, 2, 1, 6, 1, 2, 0),
    ] {
        for &(zi, zo) in &[
            (0, 0),
            (-128, 127),
            (127, -128),
            (-128, -128),
            (127, 127),
            (3, -9),
        ] {
            Case::random(
                &mut rng,
                Dims::new(h, w, cin),
                cout,
                (k, k),
                (s, s),
                (pad, pad),
                zi,
                zo,
            )
            .check();
        }
    }
}

#[test]
fn lean_paths_match_reference() {
    // The Mini-ResNet shapes (taps a multiple of 16: the lean channel
    // loop; the 3-channel stem), every border, zero points, an upper
    // clamp below 127, and multipliers of exactly 2^30 (outside the
    // folded requantization's domain) mixed in.
    let sq = |h, w, c, out_c, k, s, pad| (Dims::new(h, w, c), out_c, (k, k), (s, s), (pad, pad));
    check_variants(
        &mut Rng(11),
        &[
            sq(16, 16, 16, 16, 3, 1, 1),
            sq(16, 16, 16, 32, 3, 2, 1),
            sq(8, 8, 32, 32, 3, 1, 1),
            sq(8, 8, 16, 32, 1, 2, 0),
            sq(4, 4, 64, 8, 3, 1, 1),
            sq(32, 32, 3, 16, 3, 1, 1),
            sq(9, 7, 3, 5, 3, 1, 1),
        ],
        &[
            (0, 0, 127, false),
            (-128, -128, 127, false),
            (127, 127, 100, false),
            (3, -9, 5, false),
            (-7, 20, 127, true),
        ],
    );
}

#[test]
fn widened_input_matches_reference() {
    // Shapes that take the widened input (taps a multiple of 16, a
    // multiple of 4 channels, kernels larger than 1x1): the last stage's
    // 2x2 output (a block across two rows), pixel counts that leave a
    // short last block, strides 2 and 3, non-square kernels and
    // paddings, an upper clamp and channels outside the folded domain
    // (recomputed after each block, or the per-channel path on the same
    // gathered block).
    check_variants(
        &mut Rng(29),
        &[
            (Dims::new(2, 2, 128), 8, (3, 3), (1, 1), (1, 1)),
            (Dims::new(4, 4, 64), 12, (3, 3), (2, 2), (1, 1)),
            (Dims::new(5, 7, 16), 3, (3, 3), (2, 2), (1, 1)),
            (Dims::new(3, 5, 8), 5, (2, 3), (1, 1), (1, 0)),
            (Dims::new(6, 9, 4), 7, (4, 4), (3, 1), (0, 2)),
            (Dims::new(7, 3, 16), 2, (3, 1), (1, 2), (1, 0)),
        ],
        &[
            (0, 0, 127, false),
            (-128, 127, 127, false),
            (127, -128, 90, false),
            (5, -3, 127, true),
        ],
    );
}

/// A conv shape: input, output channels, kernel, stride, padding.
type Shape = (Dims, usize, (usize, usize), (usize, usize), (usize, usize));

/// Checks a random case of every shape in every variant `(input zero
/// point, output zero point, upper clamp, outliers)`. `outliers` gives
/// the last channel a multiplier of exactly 2^30 and the first a shift
/// of -24 (a nearly dead channel's), both outside the folded
/// requantization's domain.
fn check_variants(rng: &mut Rng, shapes: &[Shape], variants: &[(i32, i32, i8, bool)]) {
    for &(id, out_c, k, s, pad) in shapes {
        for &(zi, zo, max, outliers) in variants {
            let mut c = Case::random(rng, id, out_c, k, s, pad, zi, zo);
            c.p.act_max = max.max(c.p.act_min);
            if outliers {
                c.mult[out_c - 1] = 1 << 30;
                c.shift[0] = -24;
            }
            c.check();
        }
    }
}

#[test]
fn extreme_multipliers_and_shifts() {
    let mut rng = Rng(11);
    for shift in -31..=30 {
        for &m in &[1 << 30, i32::MAX, (1 << 30) + 12345, 0, i32::MIN] {
            let mut c = Case::random(
                &mut rng,
                Dims::new(3, 3, 2),
                3,
                (3, 3),
                (1, 1),
                (1, 1),
                5,
                -3,
            );
            c.mult = vec![m; 3];
            c.shift = vec![shift; 3];
            // Keep x * 2^shift within int32 for positive shifts, as TFLM requires.
            if shift > 0 {
                c.bias = vec![0; 3];
                c.filter.iter_mut().for_each(|w| *w = (*w).signum());
                c.input.iter_mut().for_each(|x| *x /= 64);
                if shift > 18 {
                    c.filter.fill(0);
                    c.bias = vec![1, -1, 0];
                }
            }
            c.check();
        }
    }
}

/// The case the argument checks start from: 4x4x3 input, 3x3 kernel,
/// stride 1, padding 1, 2 output channels.
fn small_case() -> Case {
    Case::random(
        &mut Rng(3),
        Dims::new(4, 4, 3),
        2,
        (3, 3),
        (1, 1),
        (1, 1),
        0,
        0,
    )
}

#[test]
fn rejects_bad_buffers() {
    let c = small_case();
    let layer = c.layer();
    let od = c.p.output_dims(c.id, 2).unwrap();
    let mut out = vec![0i8; od.len()];
    let mut scratch = vec![0i16; conv2d_s8_scratch_len(&c.p, 3)];
    assert_eq!(
        conv2d_s8(&layer, &c.input[1..], c.id, &mut out, od, &mut scratch),
        Err(Error::BufferLength {
            buffer: "input",
            expected: 48,
            actual: 47
        })
    );
    assert!(matches!(
        conv2d_s8(
            &layer,
            &c.input,
            c.id,
            &mut out,
            Dims::new(3, 4, 2),
            &mut scratch
        ),
        Err(Error::OutputDims { .. })
    ));
    assert!(matches!(
        conv2d_s8(&layer, &c.input, c.id, &mut out, od, &mut scratch[1..]),
        Err(Error::BufferLength {
            buffer: "scratch",
            ..
        })
    ));
    let short_filter = Conv2d {
        filter: &c.filter[1..],
        ..layer
    };
    assert!(matches!(
        conv2d_s8(&short_filter, &c.input, c.id, &mut out, od, &mut scratch),
        Err(Error::BufferLength {
            buffer: "filter",
            ..
        })
    ));
}

#[test]
fn rejects_bad_parameters() {
    let c = small_case();
    let layer = c.layer();
    let od = c.p.output_dims(c.id, 2).unwrap();
    let mut out = vec![0i8; od.len()];
    let mut scratch = vec![0i16; conv2d_s8_scratch_len(&c.p, 3)];
    let mut run = |l: &Conv2d<'_>| conv2d_s8(l, &c.input, c.id, &mut out, od, &mut scratch);
    let bad_shift = [31, 0];
    let l2 = Conv2d {
        requant: Requant {
            multiplier: &c.mult,
            shift: &bad_shift,
        },
        ..layer
    };
    assert_eq!(run(&l2), Err(Error::Parameter { name: "shift" }));
    let l3 = Conv2d {
        params: Conv2dParams { stride_h: 0, ..c.p },
        ..layer
    };
    assert_eq!(run(&l3), Err(Error::Parameter { name: "stride" }));
    let l4 = Conv2d {
        params: Conv2dParams { pad_w: 3, ..c.p },
        ..layer
    };
    assert_eq!(run(&l4), Err(Error::Parameter { name: "padding" }));
    let l5 = Conv2d {
        params: Conv2dParams {
            input_offset: -128,
            ..c.p
        },
        ..layer
    };
    assert_eq!(
        run(&l5),
        Err(Error::Parameter {
            name: "input_offset"
        })
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn matches_reference(
        seed in any::<u64>(),
        h in 1usize..=9, w in 1usize..=9, cin in 1usize..=9, cout in 1usize..=9,
        kh in 1usize..=4, kw in 1usize..=4, sh in 1usize..=3, sw in 1usize..=3,
        ph in 0usize..4, pw in 0usize..4,
        zi in -128i32..=127, zo in -128i32..=127,
    ) {
        let (ph, pw) = (ph % kh, pw % kw);
        prop_assume!(h + 2 * ph >= kh && w + 2 * pw >= kw);
        let mut rng = Rng(seed);
        Case::random(&mut rng, Dims::new(h, w, cin), cout, (kh, kw), (sh, sw), (ph, pw), zi, zo).check();
    }
}
