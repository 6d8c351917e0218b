//! On-target self-test of the fast kernels: small synthetic cases through
//! `conv2d_s8`, `add_s8` and `maxpool_s8` against their portable references,
//! byte for byte. In QEMU this runs the real SMLAD/SXTB16/SSAT/QADD `asm!`
//! paths, including the ones the shipped model never takes (an upper clamp
//! below 127, a misaligned or minimal scratch, the 2 × 2 tile, taps not a
//! multiple of 8); on the host it runs the emulation layer. No heap.

use shared::kernels::{
    add_s8, add_s8_reference, conv2d_s8, conv2d_s8_fast_scratch_len, conv2d_s8_reference,
    maxpool_s8, maxpool_s8_reference, AddParams, Conv2d, Conv2dParams, Dims, PoolParams, Requant,
};
/// The unit tests' SplitMix64 stream.
use shared::rng::Rng;

const MAX_IN: usize = 8 * 8 * 16;
const MAX_OUT: usize = 8 * 8 * 8;
const MAX_FILTER: usize = 8 * 9 * 16;
const MAX_TAPS: usize = 9 * 16;
const MAX_OC: usize = 8;
/// Scratch for the widened input of the largest case (`conv2d_s8_fast_scratch_len`).
const MAX_SCRATCH: usize = 1536;

/// 4-byte aligned storage, as the model blob and the firmware's statics are.
#[repr(C, align(4))]
struct A4<T>(T);

/// A conv case of the self-test.
struct ConvCase {
    name: &'static str,
    /// Input `(h, w, c)`.
    input: (usize, usize, usize),
    out_c: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    /// The last channel gets a shift of -24 (a nearly dead channel's,
    /// outside the folded requantization: the lean loop recomputes it after
    /// each block).
    outlier: bool,
}

const fn case(
    name: &'static str,
    input: (usize, usize, usize),
    out_c: usize,
    (kernel, stride, pad): (usize, usize, usize),
    outlier: bool,
) -> ConvCase {
    ConvCase {
        name,
        input,
        out_c,
        kernel,
        stride,
        pad,
        outlier,
    }
}

const CONV_CASES: [ConvCase; 6] = [
    case("conv-stem-3ch-s2", (7, 5, 3), 5, (3, 2, 1), false),
    case("conv-3x3-8ch", (6, 6, 8), 3, (3, 1, 1), false),
    case("conv-3x3-16ch", (5, 4, 16), 4, (3, 1, 1), false),
    case("conv-3x3-16ch-8oc-outlier", (4, 6, 16), 8, (3, 1, 1), true),
    case("conv-3x3-s2-16ch", (5, 5, 16), 3, (3, 2, 1), false),
    case("conv-1x1-s2-12ch", (5, 5, 12), 7, (1, 2, 0), false),
];

/// One conv case: fast with several scratch sizes and alignments against the
/// reference.
fn conv_case(
    rng: &mut Rng,
    cc: &ConvCase,
    (zi, zo): (i32, i32),
    (act_min, act_max): (i8, i8),
) -> bool {
    let ((h, w, c), out_c, k, s, pad) = (cc.input, cc.out_c, cc.kernel, cc.stride, cc.pad);
    let id = Dims::new(h, w, c);
    let p = Conv2dParams {
        kernel_h: k,
        kernel_w: k,
        stride_h: s,
        stride_w: s,
        pad_h: pad,
        pad_w: pad,
        input_offset: -zi,
        output_offset: zo,
        act_min,
        act_max,
    };
    let Some(od) = p.output_dims(id, out_c) else {
        return false;
    };
    let taps = k * k * c;
    if id.len() > MAX_IN || od.len() > MAX_OUT || out_c > MAX_OC || taps > MAX_TAPS {
        return false;
    }
    let mut input = [0i8; MAX_IN];
    let mut filter = A4([0i8; MAX_FILTER]);
    let (mut bias, mut mult, mut shift) = ([0i32; MAX_OC], [0i32; MAX_OC], [0i32; MAX_OC]);
    input[..id.len()].iter_mut().for_each(|v| *v = rng.i8());
    filter.0[..out_c * taps]
        .iter_mut()
        .for_each(|v| *v = rng.i8());
    for oc in 0..out_c {
        bias[oc] = rng.range_i32(-20_000, 20_000);
        mult[oc] = rng.range_i32(1 << 30, i32::MAX);
        shift[oc] = rng.range_i32(-14, -6);
    }
    if cc.outlier {
        shift[out_c - 1] = -24;
    }
    let layer = Conv2d {
        params: p,
        filter: &filter.0[..out_c * taps],
        bias: &bias[..out_c],
        requant: Requant {
            multiplier: &mult[..out_c],
            shift: &shift[..out_c],
        },
    };
    let input = &input[..id.len()];
    let mut scratch = A4([0i16; MAX_SCRATCH + 16]);
    let mut want = [0i8; MAX_OUT];
    let need = 2 * taps;
    if conv2d_s8_reference(
        &layer,
        input,
        id,
        &mut want[..od.len()],
        od,
        &mut scratch.0[..need],
    )
    .is_err()
    {
        return false;
    }
    // (offset, length) of the scratch: minimal (2x2 tile), misaligned with
    // and without a spare element, four and eight columns (1x4 tile), and
    // room for the widened input, aligned and not.
    let fast = conv2d_s8_fast_scratch_len(&p, id);
    if fast > MAX_SCRATCH {
        return false;
    }
    let shapes = [
        (0, need),
        (1, need + 1),
        (1, need),
        (0, 2 * need + 8),
        (1, 2 * need + 9),
        (0, fast),
        (1, fast + 1),
    ];
    let mut ok = true;
    for (off, len) in shapes {
        let mut got = [0i8; MAX_OUT];
        let r = conv2d_s8(
            &layer,
            input,
            id,
            &mut got[..od.len()],
            od,
            &mut scratch.0[off..off + len],
        );
        ok &= r.is_ok() && got[..od.len()] == want[..od.len()];
    }
    ok
}

fn add_case(rng: &mut Rng, n: usize, act_max: i8) -> bool {
    let mut a = [0i8; 512];
    let mut b = [0i8; 512];
    a[..n].iter_mut().for_each(|v| *v = rng.i8());
    b[..n].iter_mut().for_each(|v| *v = rng.i8());
    let zo = rng.range_i32(-128, 127);
    let p = AddParams {
        input1_offset: rng.range_i32(-127, 128),
        input1_multiplier: rng.range_i32(1 << 30, i32::MAX),
        input1_shift: rng.range_i32(-2, 0),
        input2_offset: rng.range_i32(-127, 128),
        input2_multiplier: rng.range_i32(1 << 30, i32::MAX),
        input2_shift: rng.range_i32(-2, 0),
        left_shift: AddParams::LEFT_SHIFT,
        output_multiplier: rng.range_i32(1 << 30, i32::MAX),
        output_shift: rng.range_i32(-19, -16),
        output_offset: zo,
        act_min: (zo as i8).min(act_max),
        act_max,
    };
    let (mut got, mut want) = ([0i8; 512], [0i8; 512]);
    add_s8(&p, &a[..n], &b[..n], &mut got[..n]).is_ok()
        && add_s8_reference(&p, &a[..n], &b[..n], &mut want[..n]).is_ok()
        && got[..n] == want[..n]
}

fn maxpool_case(rng: &mut Rng, c: usize, (lo, hi): (i8, i8)) -> bool {
    let id = Dims::new(5, 7, c);
    let p = PoolParams {
        act_min: lo,
        act_max: hi,
        ..PoolParams::MAX_3X3_S2_P1
    };
    let Some(od) = p.output_dims(id) else {
        return false;
    };
    let mut input = [0i8; 5 * 7 * 8];
    input[..id.len()].iter_mut().for_each(|v| *v = rng.i8());
    let (mut got, mut want) = ([0i8; 3 * 4 * 8], [0i8; 3 * 4 * 8]);
    let input = &input[..id.len()];
    maxpool_s8(&p, input, id, &mut got[..od.len()], od).is_ok()
        && maxpool_s8_reference(&p, input, id, &mut want[..od.len()], od).is_ok()
        && got[..od.len()] == want[..od.len()]
}

/// Runs every case, calling `report(name, passed)` for each; `true` if all pass.
pub fn run(mut report: impl FnMut(&str, bool)) -> bool {
    let mut rng = Rng(0x5EED);
    let mut all = true;
    let mut check = |name: &str, ok: bool| {
        report(name, ok);
        all &= ok;
    };
    let zps = [(0, 0), (-128, 127), (127, -128), (5, -7)];
    for (i, &z) in zps.iter().enumerate() {
        let clamp = if i % 2 == 0 {
            (-128, 127)
        } else {
            (z.1.clamp(-128, 90) as i8, 90)
        };
        for cc in &CONV_CASES {
            check(cc.name, conv_case(&mut rng, cc, z, clamp));
        }
    }
    for n in [5, 300, 512] {
        check("add-relu", add_case(&mut rng, n, 127));
        check("add-clamp-100", add_case(&mut rng, n, 100));
    }
    check("maxpool-8ch", maxpool_case(&mut rng, 8, (-128, 127)));
    check("maxpool-4ch-clamp", maxpool_case(&mut rng, 4, (-20, 60)));
    check("maxpool-3ch", maxpool_case(&mut rng, 3, (-128, 127)));
    all
}

#[cfg(test)]
mod tests {
    #[test]
    fn selftest_passes_on_the_host() {
        let mut n = 0;
        assert!(super::run(|name, ok| {
            n += 1;
            assert!(ok, "{name}");
        }));
        assert!(n > 20);
    }
}
