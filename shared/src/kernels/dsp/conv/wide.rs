//! [`ConvPath::Wide`](super::ConvPath::Wide): a kernel larger than 1x1
//! first converts its whole input once into a padded `i16` copy already in
//! column order (the "widened input"); each 4-pixel block is then gathered
//! with LDRD/STRD copies (0.6 instructions per tap instead of 2, each input
//! byte being read by up to 9 pixels), borders included, with no padding
//! checks, and run by the lean channel loop.

#[cfg(armv7em)]
use super::cols::widen_word;
use super::cols::{put_word, PAD_MAX};
use super::lean::{full_block, LeanChannel, LEAN_MAX_C};
use super::tile1x4::block_1x4;
use super::{ConvIo, ConvPlan};
use crate::kernels::dsp::isa::load_u32;
use crate::kernels::{Conv2dParams, Dims};
use core::mem::MaybeUninit;

/// Runs a layer planned [`ConvPath::Wide`](super::ConvPath::Wide).
///
/// # Safety
/// `io` is valid for the layer; the plan is `Wide` for it (the scratch
/// holds the block and the widened input).
pub(super) unsafe fn run(io: &ConvIo<'_, '_>, plan: &ConvPlan) {
    let (layer, p) = (io.layer, &io.layer.params);
    let (dims, out_c, col) = (io.in_dims, io.out_dims.c, io.col);
    let (k, taps) = (plan.k, plan.k.taps);
    let (c, ww) = (dims.c, dims.w + 2 * p.pad_w);
    let mut table = [const { MaybeUninit::<LeanChannel>::uninit() }; LEAN_MAX_C];
    plan.outliers.fill(layer, &mut table[..out_c]);
    let (f, r) = (layer.filter.as_ptr(), table.as_ptr() as *const LeanChannel);
    let mut buf = [0i8; PAD_MAX];
    // SAFETY: the scratch holds the block (`4 * taps`) and the widened
    // input after it, both 4-byte aligned (`taps` is a multiple of 16).
    let wbuf = unsafe { col.add(4 * taps) };
    // SAFETY: `wbuf` holds `wide_len` elements; `c % 4 == 0`.
    unsafe { widen(wbuf, io.input, dims, p) };
    let fix = (plan.outliers.n > 0).then_some(&plan.outliers);
    let (pixels, ow, out) = (io.pixels(), io.out_dims.w, io.output);
    // In registers: the `asm!` gathers may write memory.
    let (sh, sw, kh, run) = (p.stride_h, p.stride_w, p.kernel_h, p.kernel_w * c);
    let mut pix = 0;
    while pix < pixels {
        let valid = (pixels - pix).min(4);
        for j in 0..4 {
            // A short last block repeats its last pixel; those outputs
            // are dropped.
            let q = pix + j.min(valid - 1);
            let (oy, ox) = (q / ow, q % ow);
            // SAFETY: output pixel `(oy, ox)` reads widened rows
            // `oy * stride_h ..+ kernel_h` and columns `ox * stride_w
            // ..+ kernel_w`, inside the widened input (validated output
            // size); slot `4 * j` of the block.
            unsafe {
                let s = wbuf.add((oy * sh * ww + ox * sw) * c);
                gather_wide(col.add(4 * j), s, kh, run, ww * c);
            }
        }
        // SAFETY: pixels `pix..pix + valid` are in the output; the filter,
        // bias and requantization hold `out_c` channels; the first `out_c`
        // table entries are written.
        unsafe {
            let o = out.add(pix * out_c);
            if valid == 4 {
                full_block(layer, f, r, col, taps, o, out_c, fix);
            } else {
                block_1x4(layer, col, k, o, out_c, valid, &mut buf, plan.folded);
            }
        }
        pix += 4;
    }
}

/// The widened input of a conv: the whole input converted once to
/// offset-applied `i16`, four channels per word pair in column order (`c0,
/// c2` then `c1, c3`, as [`put_taps`](super::cols::put_taps) writes them), with `pad_h` rows and
/// `pad_w` columns of zeros (the padding, offset applied) around it. Its
/// `i16` length for `dims` and `p`; the block gather then copies word pairs
/// instead of converting bytes, and needs no padding checks.
pub(crate) const fn wide_len(dims: Dims, p: &Conv2dParams) -> usize {
    (dims.h + 2 * p.pad_h) * (dims.w + 2 * p.pad_w) * dims.c
}

/// Writes the widened input (see [`wide_len`]) of `input` into `wide`.
///
/// # Safety
/// `wide` holds `wide_len(dims, p)` elements and is 4-byte aligned;
/// `input` holds `dims.len()` values; `dims.c` is a multiple of 4.
pub(super) unsafe fn widen(wide: *mut i16, input: *const i8, dims: Dims, p: &Conv2dParams) {
    let (c, ww) = (dims.c, dims.w + 2 * p.pad_w);
    let off2 = (p.input_offset as u16 as u32) * 0x0001_0001;
    let row = dims.w * c;
    // SAFETY: every write below is inside the `wide_len` elements; every
    // read inside the input's `dims.len()`.
    unsafe {
        // Top padding rows and the left padding of the first row.
        let mut d = wide;
        let lead = (p.pad_h * ww + p.pad_w) * c;
        core::ptr::write_bytes(d, 0, lead);
        d = d.add(lead);
        for y in 0..dims.h {
            let s = input.add(y * row) as *const u8;
            widen_run(d as *mut u32, s, row, off2);
            d = d.add(row);
            // This row's right padding and the next row's left padding
            // (or, after the last row, the bottom padding rows).
            let gap = if y + 1 < dims.h {
                2 * p.pad_w * c
            } else {
                (p.pad_w + p.pad_h * ww) * c
            };
            core::ptr::write_bytes(d, 0, gap);
            d = d.add(gap);
        }
    }
}

/// Converts `len` bytes (a multiple of 4) from `s` into `len / 2` column
/// words at `d`, offset `off2` (both halfwords) added.
///
/// # Safety
/// `s ..+ len` readable, `d ..+ len / 2` words writable and 4-byte aligned.
#[inline(always)]
pub(super) unsafe fn widen_run(d: *mut u32, s: *const u8, len: usize, off2: u32) {
    let (mut d, mut s) = (d, s);
    // SAFETY: `len` bytes from `s`.
    let end = unsafe { s.add(len) };
    #[cfg(armv7em)]
    if len >= 8 && len.is_multiple_of(8) {
        // Two words per step: 14 instructions per 8 bytes (LDR: the arena
        // gives no 8-byte alignment).
        // SAFETY: reads `len` bytes from `s`, writes `len / 2` words to `d`.
        unsafe {
            core::arch::asm!(
                "2:",
                "ldr {x}, [{s}], #4",
                "ldr {y}, [{s}], #4",
                widen_word!("x"),
                "strd {e}, {x}, [{d}], #8",
                widen_word!("y"),
                "strd {e}, {y}, [{d}], #8",
                "cmp {s}, {end}",
                "blo 2b",
                s = inout(reg) s,
                d = inout(reg) d,
                end = in(reg) end,
                off = in(reg) off2,
                x = out(reg) _,
                y = out(reg) _,
                e = out(reg) _,
                options(nostack),
            );
        }
    }
    while s < end {
        // SAFETY: as above.
        unsafe {
            put_word(d, load_u32(s), off2);
            s = s.add(4);
            d = d.add(2);
        }
    }
}

/// Copies the receptive field of one pixel from the widened input into its
/// slot of a 4-pixel block: `rows` runs of `run` elements (a multiple of
/// 4) starting at `s`, `stride` elements apart, each group of 4 taps to the
/// next group slot (`16` elements on).
///
/// # Safety
/// The runs are inside the widened input; `d` is pixel `j`'s slot (`4 * j`)
/// of a 4-pixel block of `rows * run` taps; both 4-byte aligned.
#[inline(always)]
pub(super) unsafe fn gather_wide(
    d: *mut i16,
    s: *const i16,
    rows: usize,
    run: usize,
    stride: usize,
) {
    #[cfg(armv7em)]
    if run.is_multiple_of(16) && run > 0 && rows > 0 {
        let (mut d, mut s, mut rows) = (d as *mut u32, s as *const u32, rows);
        // Four groups per step: 10 instructions per 16 taps, 5 per row.
        // SAFETY: the caller's bounds; word pairs are 4-byte aligned.
        unsafe {
            core::arch::asm!(
                "3:",
                "add {end}, {s}, {len}",
                "2:",
                "ldrd {a}, {b}, [{s}], #8",
                "strd {a}, {b}, [{d}], #32",
                "ldrd {a}, {b}, [{s}], #8",
                "strd {a}, {b}, [{d}], #32",
                "ldrd {a}, {b}, [{s}], #8",
                "strd {a}, {b}, [{d}], #32",
                "ldrd {a}, {b}, [{s}], #8",
                "strd {a}, {b}, [{d}], #32",
                "cmp {s}, {end}",
                "blo 2b",
                "add {s}, {s}, {skip}",
                "subs {rows}, {rows}, #1",
                "bne 3b",
                s = inout(reg) s,
                d = inout(reg) d,
                rows = inout(reg) rows,
                len = in(reg) 2 * run,
                skip = in(reg) 2 * (stride - run),
                end = out(reg) _,
                a = out(reg) _,
                b = out(reg) _,
                options(nostack),
            );
        }
        let _ = (s, d, rows);
        return;
    }
    let (d, s) = (d as *mut u32, s as *const u32);
    for r in 0..rows {
        for g in 0..run / 4 {
            // SAFETY: the caller's bounds: group `g` of row `r`.
            unsafe {
                let src = s.add((r * stride) / 2 + 2 * g);
                let dst = d.add(8 * (r * run / 4 + g));
                dst.write(src.read());
                dst.add(1).write(src.add(1).read());
            }
        }
    }
}
