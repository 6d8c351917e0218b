//! [`ConvPath::Stem`](super::ConvPath::Stem): taps not a multiple of 4
//! (the 3-channel stem, 27 taps): the filter rows padded to a multiple of
//! 16 taps in an aligned stack copy with zeros after each row, so the lean
//! channel loop runs it; a 3x3x3 stride-1 layer builds its interior
//! 4-pixel blocks from unaligned loads ([`stem_block`]).

use super::cols::PAD_MAX;
use super::lean::{lean_block, lean_block_clamped, LeanChannel, LEAN_MAX_C};
use super::tile1x4::block_1x4;
use super::{ConvIo, ConvPlan};
use crate::kernels::dsp::isa::{load_u32, sadd16, sxtb16, sxtb16_ror8};
use core::mem::MaybeUninit;

/// Runs a layer planned [`ConvPath::Stem`](super::ConvPath::Stem) (`blocks`
/// as planned).
///
/// # Safety
/// `io` is valid for the layer; the plan is `Stem` for it.
pub(super) unsafe fn run(io: &ConvIo<'_, '_>, plan: &ConvPlan, blocks: bool) {
    let (layer, p) = (io.layer, &io.layer.params);
    let (dims, out_c, col, k) = (io.in_dims, io.out_dims.c, io.col, plan.k);
    let (taps, r16) = (k.row, k.taps);
    let mut stem_filter = MaybeUninit::<[u32; STEM_FILTER_MAX / 4]>::uninit();
    let f = stem_filter.as_mut_ptr() as *mut i8;
    // SAFETY: `out_c * r16 <= STEM_FILTER_MAX` bytes (the plan); row `oc`
    // of the filter.
    unsafe {
        core::ptr::write_bytes(f, 0, out_c * r16);
        for oc in 0..out_c {
            let src = layer.filter.as_ptr().add(oc * taps);
            core::ptr::copy_nonoverlapping(src, f.add(oc * r16), taps);
        }
    }
    let f = f as *const i8;
    // `out_c * 16 <= STEM_FILTER_MAX`: the channels fit the table.
    debug_assert!(out_c <= LEAN_MAX_C && plan.outliers.n == 0);
    let mut table = [const { MaybeUninit::<LeanChannel>::uninit() }; LEAN_MAX_C];
    plan.outliers.fill(layer, &mut table[..out_c]);
    let r = table.as_ptr() as *const LeanChannel;
    let mut buf = [0i8; PAD_MAX];
    let mut cols_buf = [0u32; PAD_MAX / 4];
    let (pixels, ow) = (io.pixels(), io.out_dims.w);
    let mut pix = 0;
    while pix < pixels {
        let valid = (pixels - pix).min(4);
        if blocks && valid == 4 {
            let (oy, ox) = (pix / ow, pix % ow);
            if ox + 4 <= ow
                && ox >= p.pad_w
                && ox + 3 - p.pad_w + 3 <= dims.w
                && oy >= p.pad_h
                && oy - p.pad_h + 3 <= dims.h
            {
                // SAFETY: the four receptive fields are inside the input
                // (stride 1); the block holds 4 columns of 32 taps; pixels
                // `pix..pix + 4` are in the output; the table is written.
                unsafe {
                    let r0 = io.input.add(((oy - p.pad_h) * dims.w + ox - p.pad_w) * 3);
                    stem_block(col, r0 as *const u8, dims.w * 3, p.input_offset);
                    let o = io.output.add(pix * out_c);
                    lean_block::<false, false>(layer, f, r, col, r16, o, out_c);
                }
                pix += 4;
                continue;
            }
        }
        // SAFETY: the block holds 4 padded columns; pixels `pix..pix +
        // valid` are in the output; the table is written.
        unsafe {
            io.gather_block(k, pix, valid, Some(&mut cols_buf));
            let o = io.output.add(pix * out_c);
            if valid == 4 {
                lean_block_clamped(layer, f, r, col, r16, o, out_c);
            } else {
                block_1x4(layer, col, k, o, out_c, valid, &mut buf, plan.folded);
            }
        }
        pix += 4;
    }
}

/// Bytes of the stem's padded filter copy (a stack buffer): 16 channels of
/// 32 taps is 512.
pub(super) const STEM_FILTER_MAX: usize = 1024;

/// The stem's column of pixel `j` (of an `n`-pixel block) whose 3x3x3
/// receptive field lies inside the input, its top-left byte at `r0` and
/// rows `stride` bytes apart: the 8 words of the padded 32-tap column
/// (taps 27..32 as the zero point) put together from unaligned loads inside
/// the three 9-byte runs, then converted as `put_taps` does.
///
/// # Safety
/// `r0 ..+ 9`, `r0 + stride ..+ 9`, `r0 + 2 * stride ..+ 9` are readable;
/// `col` holds an `n`-pixel block of 32 taps, `j < n`.
#[inline(always)]
pub(super) unsafe fn stem_column(
    col: *mut i16,
    n: usize,
    j: usize,
    r0: *const u8,
    stride: usize,
    input_offset: i32,
) {
    // SAFETY: the caller's bounds; every load lies within one 9-byte run.
    unsafe {
        let r1 = r0.add(stride);
        let r2 = r1.add(stride);
        let zp = (-input_offset) as u8 as u32;
        let off2 = (input_offset as u16 as u32) * 0x0001_0001;
        let w = [
            load_u32(r0),
            load_u32(r0.add(4)),
            (*r0.add(8) as u32) | (load_u32(r1) << 8),
            load_u32(r1.add(3)),
            (*r1.add(7) as u32) | ((*r1.add(8) as u32) << 8) | (load_u32(r2) << 16),
            load_u32(r2.add(2)),
            (load_u32(r2.add(5)) >> 8) | (zp << 24),
        ];
        let d = col.add(4 * j) as *mut u32;
        let step = 2 * n;
        for (g, &x) in w.iter().enumerate() {
            d.add(g * step).write(sadd16(sxtb16(x), off2));
            d.add(g * step + 1).write(sadd16(sxtb16_ror8(x), off2));
        }
        // Taps 28..32: the zero point, 0 once offset.
        d.add(7 * step).write(0);
        d.add(7 * step + 1).write(0);
    }
}

/// The stem's 4-pixel block at output pixel `(oy, ox)`, all four in one
/// output row with their receptive fields inside the input (stride 1).
///
/// # Safety
/// As [`stem_column`] for the four pixels.
#[inline(never)]
pub(super) unsafe fn stem_block(col: *mut i16, r0: *const u8, stride: usize, input_offset: i32) {
    for j in 0..4 {
        // SAFETY: pixel `j` starts 3 bytes after pixel `j - 1`.
        unsafe { stem_column(col, 4, j, r0.add(3 * j), stride, input_offset) };
    }
}
