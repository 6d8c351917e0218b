//! Fast `maxpool_s8` for channel counts that are a multiple of 4: four
//! channels per word, the running maximum with SSUB8 + SEL.

use super::isa::{load_u32, smax8, smin8};
use crate::kernels::{Dims, PoolParams};

/// Max pooling, four channels at a time. The caller has validated the
/// parameters and buffers; returns `false` (and does nothing) when
/// `input_dims.c` is not a multiple of 4.
pub(crate) fn maxpool_s8_dsp(
    p: &PoolParams,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
) -> bool {
    let c = input_dims.c;
    if !c.is_multiple_of(4) {
        return false;
    }
    debug_assert!(input.len() == input_dims.len() && output.len() == output_dims.len());
    let splat = |v: i8| (v as u8 as u32) * 0x0101_0101;
    let (lo, hi) = (splat(p.act_min), splat(p.act_max));
    let clamp = p.act_min != i8::MIN || p.act_max != i8::MAX;
    let (inp, out) = (input.as_ptr() as *const u8, output.as_mut_ptr() as *mut u8);
    let row = input_dims.w * c;
    for oy in 0..output_dims.h {
        let y0 = (oy * p.stride_h).saturating_sub(p.pad_h);
        let y1 = (oy * p.stride_h + p.kernel_h - p.pad_h).min(input_dims.h);
        for ox in 0..output_dims.w {
            let x0 = (ox * p.stride_w).saturating_sub(p.pad_w);
            let x1 = (ox * p.stride_w + p.kernel_w - p.pad_w).min(input_dims.w);
            // SAFETY: validated shapes: the window lies in the input, the
            // pixel in the output.
            unsafe {
                let o = out.add((oy * output_dims.w + ox) * c);
                let first = inp.add(y0 * row + x0 * c);
                if y1 - y0 == 3 && x1 - x0 == 3 {
                    // A whole 3x3 window (every interior output of the stem's
                    // max pool): nine loads, eight maxima per 4 channels.
                    let (r0, r1, r2) = (first, first.add(row), first.add(2 * row));
                    let mut g = 0;
                    while g < c {
                        let ld = |r: *const u8, x: usize| load_u32(r.add(x * c + g));
                        let a = smax8(smax8(ld(r0, 0), ld(r0, 1)), ld(r0, 2));
                        let b = smax8(smax8(ld(r1, 0), ld(r1, 1)), ld(r1, 2));
                        let m = smax8(smax8(ld(r2, 0), ld(r2, 1)), ld(r2, 2));
                        let mut m = smax8(smax8(a, b), m);
                        if clamp {
                            m = smin8(smax8(m, lo), hi);
                        }
                        (o.add(g) as *mut u32).write_unaligned(m.to_le());
                        g += 4;
                    }
                    continue;
                }
                for g in (0..c).step_by(4) {
                    let mut m = splat(i8::MIN);
                    let mut r = first.add(g);
                    for _ in y0..y1 {
                        let mut q = r;
                        for _ in x0..x1 {
                            m = smax8(m, load_u32(q));
                            q = q.add(c);
                        }
                        r = r.add(row);
                    }
                    if clamp {
                        m = smin8(smax8(m, lo), hi);
                    }
                    (o.add(g) as *mut u32).write_unaligned(m.to_le());
                }
            }
        }
    }
    true
}
