//! [`ConvPath::Tile1x4`](super::ConvPath::Tile1x4): blocks of four
//! pixels gathered pixel by pixel, then the 1 × 4 tile with a
//! requantization per channel ([`block_1x4`], also the lean paths' short
//! last block).

use super::cols::{row_ptr, Cols, PAD_MAX};
use super::dot::dot_1x4;
use super::{ConvIo, ConvPlan};
use crate::kernels::dsp::requant::{ChannelRequant, FoldedRequant};
use crate::kernels::Conv2d;

/// Runs a layer planned [`ConvPath::Tile1x4`](super::ConvPath::Tile1x4).
///
/// # Safety
/// `io` is valid for the layer; the plan is `Tile1x4 { padded }` for it.
pub(super) unsafe fn run(io: &ConvIo<'_, '_>, plan: &ConvPlan, padded: bool) {
    let (out_c, k) = (io.out_dims.c, plan.k);
    let mut buf = [0i8; PAD_MAX];
    let mut cols_buf = [0u32; PAD_MAX / 4];
    let pixels = io.pixels();
    let mut pix = 0;
    while pix < pixels {
        let valid = (pixels - pix).min(4);
        let cb = if padded { Some(&mut cols_buf) } else { None };
        // SAFETY: the block holds 4 columns of `k`; pixels `pix..pix +
        // valid` are in the output; the filter, bias and requantization
        // hold `out_c` channels.
        unsafe {
            io.gather_block_outlined(k, pix, valid, cb);
            let o = io.output.add(pix * out_c);
            block_1x4(io.layer, io.col, k, o, out_c, valid, &mut buf, plan.folded);
        }
        pix += 4;
    }
}

/// Every output channel of one 4-pixel block: the 1 × 4 tile, then the
/// requantization of its four sums ([`FoldedRequant`] when `folded`: every
/// channel is in its domain). Not inlined, so the channel loop gets
/// its own register allocation instead of the whole kernel's.
///
/// # Safety
/// `layer` holds `out_c` channels of `k.taps` taps; `col` is a 4-pixel
/// block of `k`; `o` points at `valid` (≤ 4) output pixels of `out_c`.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block_1x4(
    layer: &Conv2d<'_>,
    col: *const i16,
    k: Cols,
    o: *mut i8,
    out_c: usize,
    valid: usize,
    buf: &mut [i8; PAD_MAX],
    folded: bool,
) {
    let p = &layer.params;
    if folded && valid == 4 {
        let (min, max) = (p.act_min as i32, p.act_max as i32);
        let (mult, shift) = (
            layer.requant.multiplier.as_ptr(),
            layer.requant.shift.as_ptr(),
        );
        for oc in 0..out_c {
            // SAFETY: as below; every channel's pair is accepted by
            // `FoldedRequant` (checked once per layer by the caller).
            unsafe {
                let b = *layer.bias.get_unchecked(oc);
                let w = row_ptr(layer.filter, oc, k, buf);
                let a = dot_1x4(w, col, k, [b; 4]);
                let f = FoldedRequant::new_unchecked(
                    *mult.add(oc),
                    (-*shift.add(oc)) as u32,
                    p.output_offset,
                );
                let q = o.add(oc);
                if max == 127 {
                    *q = f.apply_max127(a[0], min);
                    *q.add(out_c) = f.apply_max127(a[1], min);
                    *q.add(2 * out_c) = f.apply_max127(a[2], min);
                    *q.add(3 * out_c) = f.apply_max127(a[3], min);
                } else {
                    *q = f.apply(a[0], min, max);
                    *q.add(out_c) = f.apply(a[1], min, max);
                    *q.add(2 * out_c) = f.apply(a[2], min, max);
                    *q.add(3 * out_c) = f.apply(a[3], min, max);
                }
            }
        }
        return;
    }
    for oc in 0..out_c {
        // SAFETY: `oc < out_c`: row `oc` of the filter, bias and requant
        // entries; outputs `j * out_c + oc` for `j < valid`.
        unsafe {
            let b = *layer.bias.get_unchecked(oc);
            let w = row_ptr(layer.filter, oc, k, buf);
            let a = dot_1x4(w, col, k, [b; 4]);
            let r = ChannelRequant::new(
                *layer.requant.multiplier.get_unchecked(oc),
                *layer.requant.shift.get_unchecked(oc),
                p.output_offset,
                p.act_min,
                p.act_max,
            );
            let q = o.add(oc);
            if valid == 4 && r.max_is_127() {
                *q = r.apply_no_min_max127(a[0]);
                *q.add(out_c) = r.apply_no_min_max127(a[1]);
                *q.add(2 * out_c) = r.apply_no_min_max127(a[2]);
                *q.add(3 * out_c) = r.apply_no_min_max127(a[3]);
            } else if valid == 4 {
                *q = r.apply_no_min(a[0]);
                *q.add(out_c) = r.apply_no_min(a[1]);
                *q.add(2 * out_c) = r.apply_no_min(a[2]);
                *q.add(3 * out_c) = r.apply_no_min(a[3]);
            } else {
                for (j, &aj) in a.iter().enumerate().take(valid) {
                    *q.add(j * out_c) = r.apply_no_min(aj);
                }
            }
        }
    }
}
