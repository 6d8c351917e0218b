//! [`ConvPath::Tile2x2`](super::ConvPath::Tile2x2): scratch for only two
//! columns: blocks of two pixels, two output channels at a time
//! ([`dot_2x2`]; an odd last channel by [`dot_1x2`]).

use super::cols::{col_word, row_ptr, Cols, PAD_MAX};
use super::{ConvIo, ConvPlan};
use crate::kernels::dsp::isa::{load_u32, smlad, sxtb16, sxtb16_ror8};
use crate::kernels::dsp::requant::ChannelRequant;

/// Runs a layer planned [`ConvPath::Tile2x2`](super::ConvPath::Tile2x2).
///
/// # Safety
/// `io` is valid for the layer; the plan is `Tile2x2 { padded }` for it.
pub(super) unsafe fn run(io: &ConvIo<'_, '_>, plan: &ConvPlan, padded: bool) {
    let (out_c, k) = (io.out_dims.c, plan.k);
    let mut cols_buf = [0u32; PAD_MAX / 4];
    let pixels = io.pixels();
    let mut pix = 0;
    while pix < pixels {
        let valid = (pixels - pix).min(2);
        let cb = if padded { Some(&mut cols_buf) } else { None };
        // SAFETY: the block holds 2 columns of `k`; pixels `pix..pix +
        // valid` are in the output.
        unsafe {
            io.gather_block_outlined(k, pix, valid, cb);
            block_2x2(io, k, io.output.add(pix * out_c), valid);
        }
        pix += 2;
    }
}

/// Every output channel of one 2-pixel block, two channels at a time.
///
/// # Safety
/// The scratch holds a 2-pixel block of `k`; `o` points at `valid` (≤ 2)
/// output pixels of `out_c`.
#[inline(always)]
unsafe fn block_2x2(io: &ConvIo<'_, '_>, k: Cols, o: *mut i8, valid: usize) {
    let (layer, p, out_c, col) = (io.layer, &io.layer.params, io.out_dims.c, io.col);
    let (bias, mult, shift) = (
        layer.bias.as_ptr(),
        layer.requant.multiplier.as_ptr(),
        layer.requant.shift.as_ptr(),
    );
    let rq = |oc: usize| -> ChannelRequant {
        // SAFETY: `oc < out_c`.
        let (m, s) = unsafe { (*mult.add(oc), *shift.add(oc)) };
        ChannelRequant::new(m, s, p.output_offset, p.act_min, p.act_max)
    };
    let mut buf = [0i8; PAD_MAX];
    let mut buf1 = [0i8; PAD_MAX];
    let mut oc = 0;
    while oc < out_c {
        // An odd last channel runs alone (`dot_1x2`): `oc1 == oc`
        // then, and only channel `oc` is stored.
        let oc1 = (oc + 1).min(out_c - 1);
        // SAFETY: rows `oc`, `oc1` of the filter; `j < valid`.
        unsafe {
            let (b0, b1) = (*bias.add(oc), *bias.add(oc1));
            let w0 = row_ptr(layer.filter, oc, k, &mut buf);
            let a = if oc1 == oc + 1 {
                let w1 = row_ptr(layer.filter, oc1, k, &mut buf1);
                dot_2x2(w0, w1, col, k, [b0, b0, b1, b1])
            } else {
                let d = dot_1x2(w0, col, k, b0);
                [d[0], d[1], b1, b1]
            };
            let r0 = rq(oc);
            *o.add(oc) = r0.apply_no_min(a[0]);
            if valid > 1 {
                *o.add(out_c + oc) = r0.apply_no_min(a[1]);
            }
            if oc1 == oc + 1 {
                let r1 = rq(oc1);
                *o.add(oc1) = r1.apply_no_min(a[2]);
                if valid > 1 {
                    *o.add(out_c + oc1) = r1.apply_no_min(a[3]);
                }
            }
        }
        oc += 2;
    }
}

/// Two output channels (rows `w0`, `w1`) × two pixels of the block
/// `col`: `[oc0·px0, oc0·px1, oc1·px0, oc1·px1]`.
///
/// # Safety
/// Two filter rows of `taps` values; `col` is a 2-pixel block of `k`.
#[inline(always)]
pub(super) unsafe fn dot_2x2(
    w0: *const i8,
    w1: *const i8,
    col: *const i16,
    k: Cols,
    acc: [i32; 4],
) -> [i32; 4] {
    let [mut a00, mut a01, mut a10, mut a11] = acc;
    let (mut pw0, mut pw1) = (w0 as *const u8, w1 as *const u8);
    let mut pc = col as *const u8;
    // SAFETY: `full` filter values.
    let end = unsafe { pw0.add(k.full) };
    while pw0 < end {
        // SAFETY: one word of each row and one 2-pixel group per step.
        unsafe {
            let (x0e, x0o) = (col_word(pc), col_word(pc.add(4)));
            let (x1e, x1o) = (col_word(pc.add(8)), col_word(pc.add(12)));
            let wa = load_u32(pw0);
            let (we, wo) = (sxtb16(wa), sxtb16_ror8(wa));
            a00 = smlad(we, x0e, a00);
            a00 = smlad(wo, x0o, a00);
            a01 = smlad(we, x1e, a01);
            a01 = smlad(wo, x1o, a01);
            let wb = load_u32(pw1);
            let (we, wo) = (sxtb16(wb), sxtb16_ror8(wb));
            a10 = smlad(we, x0e, a10);
            a10 = smlad(wo, x0o, a10);
            a11 = smlad(we, x1e, a11);
            a11 = smlad(wo, x1o, a11);
            pw0 = pw0.add(4);
            pw1 = pw1.add(4);
            pc = pc.add(16);
        }
    }
    let tail = k.taps - k.full;
    for t in 0..tail {
        // SAFETY: tail taps of the rows and of each pixel.
        unsafe {
            let (wa, wb) = (*w0.add(k.full + t) as i32, *w1.add(k.full + t) as i32);
            let x = col.add(2 * k.full + t);
            let (x0, x1) = (*x as i32, *x.add(tail) as i32);
            a00 = a00.wrapping_add(wa * x0);
            a01 = a01.wrapping_add(wa * x1);
            a10 = a10.wrapping_add(wb * x0);
            a11 = a11.wrapping_add(wb * x1);
        }
    }
    [a00, a01, a10, a11]
}

/// One output channel × the two pixels of a 2-pixel block: the 1 × 2 tile,
/// for the odd last channel of the 2 × 2 tile.
///
/// # Safety
/// `w` holds `taps` values; `col` is a 2-pixel block of `k`.
#[inline(always)]
pub(super) unsafe fn dot_1x2(w: *const i8, col: *const i16, k: Cols, b: i32) -> [i32; 2] {
    let [mut a0, mut a1] = [b, b];
    let mut pw = w as *const u8;
    let mut pc = col as *const u8;
    // SAFETY: `full` filter values.
    let end = unsafe { pw.add(k.full) };
    while pw < end {
        // SAFETY: one weight word and one 2-pixel group per step.
        unsafe {
            let wv = load_u32(pw);
            let (we, wo) = (sxtb16(wv), sxtb16_ror8(wv));
            a0 = smlad(we, col_word(pc), a0);
            a0 = smlad(wo, col_word(pc.add(4)), a0);
            a1 = smlad(we, col_word(pc.add(8)), a1);
            a1 = smlad(wo, col_word(pc.add(12)), a1);
            pw = pw.add(4);
            pc = pc.add(16);
        }
    }
    let tail = k.taps - k.full;
    for t in 0..tail {
        // SAFETY: tail taps.
        unsafe {
            let wt = *w.add(k.full + t) as i32;
            let x = col.add(2 * k.full + t);
            a0 = a0.wrapping_add(wt * *x as i32);
            a1 = a1.wrapping_add(wt * *x.add(tail) as i32);
        }
    }
    [a0, a1]
}
