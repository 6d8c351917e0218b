//! Fast `conv2d_s8`: im2col of 4 (or 2) output pixels at once into
//! interleaved `i16` columns with the input offset applied (SXTB16 + SADD16,
//! four channels per word), then a register tile of SMLADs: 1 output channel
//! × 4 pixels when the scratch holds four columns, else 2 output channels × 2
//! pixels. Weights are read straight from the OHWI filter as words and
//! unpacked with SXTB16 / SXTB16 ROR #8.
//!
//! With scratch for it ([`wide_len`]), a kernel larger than 1x1 first
//! converts its whole input once into a padded `i16` copy already in column
//! order (the "widened input"); each block is then gathered with LDRD/STRD
//! copies (0.6 instructions per tap instead of 2, each input byte being
//! read by up to 9 pixels), borders included, with no padding checks.
//!
//! Requantization in the lean channel loops is [`FoldedRequant`]; a layer
//! with a few channels outside its domain (a nearly dead channel whose
//! shift is below -21) still takes the lean loop, and those channels are
//! recomputed exactly after each block ([`Outliers`]).
//!
//! **Column layout** for `n` pixels and `taps = kernel_h * kernel_w * in_c`,
//! `full = taps & !3`: tap group `g` (taps `4g..4g + 4`) of pixel `j` sits at
//! `i16` offset `4 * n * g + 4 * j`, in the order `t0, t2, t1, t3`: SXTB16 of
//! a weight word gives `(w0, w2)` and SXTB16 ROR #8 gives `(w1, w3)`, so one
//! column word lines up with each, and the `n` pixels of a group are
//! contiguous for one pointer walk. The `taps - full` tail taps (only when
//! `taps` is not a multiple of 4, e.g. the 3-channel stem) follow at
//! `n * full + j * (taps - full)` in natural order and are done with scalar
//! multiplies.
//!
//! The sums are the reference kernel's int32 sums in another order; int32
//! wrapping addition is associative and commutative, so the bytes are
//! identical.

use super::isa::{load_u32, sadd16, smlad, sxtb16, sxtb16_ror8};
#[cfg(armv7em)]
use super::requant::folded_requant;
use super::requant::{ChannelRequant, FoldedRequant};
use crate::kernels::{Conv2d, Conv2dParams, Dims};
use core::mem::MaybeUninit;

/// A column word (4-byte aligned: the kernel aligns the scratch).
///
/// # Safety
/// `p` is 4-byte aligned and readable for 4 bytes.
#[inline(always)]
unsafe fn col_word(p: *const u8) -> u32 {
    // SAFETY: the caller's guarantee.
    unsafe { (p as *const u32).read() }
}

/// Geometry of one im2col block.
#[derive(Clone, Copy)]
struct Cols {
    /// Pixels per block (2 or 4).
    n: usize,
    /// Taps per column: the layer's taps, or rounded up to a multiple of 4
    /// on the padded path.
    taps: usize,
    /// Taps in whole groups of four.
    full: usize,
    /// The layer's taps: the filter's row stride.
    row: usize,
}

impl Cols {
    /// Offset of flat tap `t` of pixel `j`.
    #[inline(always)]
    fn slot(&self, t: usize, j: usize) -> usize {
        if t < self.full {
            (t & !3) * self.n + 4 * j + (((t & 1) << 1) | ((t >> 1) & 1))
        } else {
            self.n * self.full + j * (self.taps - self.full) + (t - self.full)
        }
    }
}

/// The asm text that converts word `{$x}` (four int8 channels) into the
/// two column words `{e}` (`c0, c2`) and `{$x}` (`c1, c3`), offset `{off}`
/// added to each halfword: SXTB16, SXTB16 ROR #8, two SADD16.
#[cfg(armv7em)]
macro_rules! widen_word {
    ($x:literal) => {
        concat!(
            "sxtb16 {e}, {",
            $x,
            "}\n",
            "sxtb16 {",
            $x,
            "}, {",
            $x,
            "}, ror #8\n",
            "sadd16 {e}, {e}, {off}\n",
            "sadd16 {",
            $x,
            "}, {",
            $x,
            "}, {off}\n",
        )
    };
}

/// The portable twin of [`widen_word!`]: writes the two column words of
/// `x` at `d`.
///
/// # Safety
/// `d ..+ 2` words are writable (4-byte aligned).
#[inline(always)]
unsafe fn put_word(d: *mut u32, x: u32, off2: u32) {
    // SAFETY: the caller's.
    unsafe {
        d.write(sadd16(sxtb16(x), off2));
        d.add(1).write(sadd16(sxtb16_ror8(x), off2));
    }
}

/// Writes `len` taps from flat tap `base` of pixel `j`: zeros when `src` is
/// `None`, else `src[i] + offset`.
///
/// # Safety
/// `col` holds `n * taps` elements (4-byte aligned), `base + len <= taps`,
/// and `src` (when given) holds `len` values.
#[inline(always)]
unsafe fn put_taps(
    col: *mut i16,
    k: Cols,
    j: usize,
    base: usize,
    len: usize,
    src: Option<*const i8>,
    off: i32,
) {
    if base.is_multiple_of(4) && len.is_multiple_of(4) && base + len <= k.full {
        // Whole groups: one word of 4 channels → two column words, then the
        // next group of this pixel, `4 * n` halfwords on.
        let off2 = (off as u16 as u32) * 0x0001_0001;
        // SAFETY: the caller's bounds; group starts are 8-byte aligned.
        let mut d = unsafe { col.add(k.slot(base, j)) } as *mut u32;
        let step = 2 * k.n; // words per group
        match src {
            Some(s) => {
                let mut s = s as *const u8;
                // SAFETY: `len` source bytes.
                let end = unsafe { s.add(len) };
                #[cfg(armv7em)]
                if len > 0 && (k.n == 4 || k.n == 2) {
                    // 8 instructions per 4 taps: LDR, 2 SXTB16, 2 SADD16,
                    // STRD to the next group of this pixel, CMP, BLO.
                    macro_rules! gather {
                        ($step:literal) => {
                            // SAFETY: reads `len` bytes from `s`, writes
                            // `len / 4` 8-byte-aligned word pairs `8 * n`
                            // bytes apart from `d`, as the portable loop.
                            unsafe {
                                core::arch::asm!(
                                    "2:",
                                    "ldr {x}, [{s}], #4",
                                    widen_word!("x"),
                                    concat!("strd {e}, {x}, [{d}], #", $step),
                                    "cmp {s}, {end}",
                                    "blo 2b",
                                    s = inout(reg) s => _,
                                    d = inout(reg) d => _,
                                    end = in(reg) end,
                                    off = in(reg) off2,
                                    x = out(reg) _,
                                    e = out(reg) _,
                                    options(nostack),
                                )
                            }
                        };
                    }
                    if k.n == 4 {
                        gather!("32");
                    } else {
                        gather!("16");
                    }
                    return;
                }
                while s < end {
                    // SAFETY: as above.
                    unsafe {
                        let x = load_u32(s);
                        put_word(d, x, off2);
                        s = s.add(4);
                        d = d.add(step);
                    }
                }
            }
            None => {
                for _ in 0..len / 4 {
                    // SAFETY: as above.
                    unsafe {
                        d.write(0);
                        d.add(1).write(0);
                        d = d.add(step);
                    }
                }
            }
        }
    } else {
        for i in 0..len {
            // SAFETY: the caller's bounds; `slot` maps taps into the block.
            unsafe {
                let v = match src {
                    Some(s) => (*s.add(i) as i32 + off) as i16,
                    None => 0,
                };
                *col.add(k.slot(base + i, j)) = v;
            }
        }
    }
}

/// The asm rows loop of [`im2col`]'s inside case: `rows` runs of
/// `row_len` bytes (a non-zero multiple of 4) from `s`, `skip` bytes
/// between runs, into the 4-pixel column of one pixel at `d`.
///
/// # Safety
/// The runs are readable; `d` is that pixel's slot of a 4-pixel block of
/// `rows * row_len` taps; `rows > 0`.
#[cfg(armv7em)]
#[inline(always)]
unsafe fn gather_rows(
    d: *mut u32,
    s: *const u8,
    rows: usize,
    row_len: usize,
    skip: usize,
    off2: u32,
) {
    let (mut s, mut d, mut rows) = (s, d, rows);
    // SAFETY: the caller's bounds.
    unsafe {
        core::arch::asm!(
            "3:",
            "add {end}, {s}, {len}",
            "2:",
            "ldr {x}, [{s}], #4",
            widen_word!("x"),
            "strd {e}, {x}, [{d}], #32",
            "cmp {s}, {end}",
            "blo 2b",
            "add {s}, {s}, {skip}",
            "subs {rows}, {rows}, #1",
            "bne 3b",
            s = inout(reg) s,
            d = inout(reg) d,
            rows = inout(reg) rows,
            len = in(reg) row_len,
            skip = in(reg) skip,
            off = in(reg) off2,
            end = out(reg) _,
            x = out(reg) _,
            e = out(reg) _,
            options(nostack),
        );
    }
    let _ = (s, d, rows);
}

/// Gathers the receptive field of output pixel `(oy, ox)` as pixel `j` of
/// the block at `col`, offset applied, padding as 0.
///
/// # Safety
/// `col` holds `n * taps` elements, `j < n`, `input` holds `dims.len()`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn im2col(
    col: *mut i16,
    k: Cols,
    j: usize,
    input: *const i8,
    dims: Dims,
    p: &Conv2dParams,
    oy: usize,
    ox: usize,
) {
    let c = dims.c;
    let row_len = p.kernel_w * c;
    let x0 = ox * p.stride_w;
    // The whole kernel row inside the input: one contiguous run of `row_len`.
    let row_inside = x0 >= p.pad_w && x0 - p.pad_w + p.kernel_w <= dims.w;
    #[cfg(armv7em)]
    {
        let y0 = oy * p.stride_h;
        if k.n == 4
            && row_inside
            && y0 >= p.pad_h
            && y0 - p.pad_h + p.kernel_h <= dims.h
            && row_len > 0
            && row_len.is_multiple_of(4)
            && p.kernel_h * row_len == k.full
        {
            // The whole receptive field inside the input (taps a multiple of
            // 4): every kernel row as one run, all rows in one asm loop; 8
            // instructions per 4 taps as `put_taps`, 5 per row.
            let off2 = (p.input_offset as u16 as u32) * 0x0001_0001;
            // SAFETY: rows `y0 - pad_h ..+ kernel_h`, columns `x0 - pad_w
            // ..+ kernel_w` are in the input; the block holds `full` taps of
            // pixel `j` from slot `4 * j`, group `g` at `+ 16 * g` halfwords.
            unsafe {
                let src = input.add(((y0 - p.pad_h) * dims.w + x0 - p.pad_w) * c) as *const u8;
                gather_rows(
                    col.add(4 * j) as *mut u32,
                    src,
                    p.kernel_h,
                    row_len,
                    dims.w * c - row_len,
                    off2,
                );
            }
            return;
        }
    }
    for ky in 0..p.kernel_h {
        let iy = (oy * p.stride_h + ky).wrapping_sub(p.pad_h);
        let row = ky * row_len;
        if iy >= dims.h {
            // SAFETY: `row + row_len <= taps`.
            unsafe { put_taps(col, k, j, row, row_len, None, 0) };
            continue;
        }
        if row_inside {
            // SAFETY: pixels `(iy, x0 - pad_w ..+ kernel_w)` are in the input.
            unsafe {
                let src = input.add((iy * dims.w + x0 - p.pad_w) * c);
                put_taps(col, k, j, row, row_len, Some(src), p.input_offset);
            }
            continue;
        }
        for kx in 0..p.kernel_w {
            let ix = (x0 + kx).wrapping_sub(p.pad_w);
            let src = if ix >= dims.w {
                None
            } else {
                // SAFETY: `(iy, ix)` is inside the input.
                Some(unsafe { input.add((iy * dims.w + ix) * c) })
            };
            // SAFETY: `row + kx * c + c <= taps`.
            unsafe { put_taps(col, k, j, row + kx * c, c, src, p.input_offset) };
        }
    }
}

/// The widened input of a conv: the whole input converted once to
/// offset-applied `i16`, four channels per word pair in column order (`c0,
/// c2` then `c1, c3`, as [`put_taps`] writes them), with `pad_h` rows and
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
unsafe fn widen(wide: *mut i16, input: *const i8, dims: Dims, p: &Conv2dParams) {
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
unsafe fn widen_run(d: *mut u32, s: *const u8, len: usize, off2: u32) {
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
unsafe fn gather_wide(d: *mut i16, s: *const i16, rows: usize, run: usize, stride: usize) {
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

/// Longest padded column the padded path handles (stack buffers).
const PAD_MAX: usize = 256;

/// Most output channels of the lean channel loop (its table of prepared
/// requantizations is a stack buffer).
const LEAN_MAX_C: usize = 128;

/// Bytes of the stem's padded filter copy (a stack buffer): 16 channels of
/// 32 taps is 512.
const STEM_FILTER_MAX: usize = 1024;

/// Filter row `oc`, readable for `k.taps` bytes: in place, or (on the padded
/// path, for the last rows, whose padded read would run past the filter)
/// copied into `buf` with zeros after it.
///
/// # Safety
/// `oc` is a channel of `filter`; on the padded path `k.taps <= PAD_MAX`.
#[inline(always)]
unsafe fn row_ptr(filter: &[i8], oc: usize, k: Cols, buf: &mut [i8; PAD_MAX]) -> *const i8 {
    let start = oc * k.row;
    if start + k.taps <= filter.len() {
        // SAFETY: in bounds.
        unsafe { filter.as_ptr().add(start) }
    } else {
        buf[..k.row].copy_from_slice(&filter[start..start + k.row]);
        buf[k.row..k.taps].fill(0);
        buf.as_ptr()
    }
}

/// Copies `n` bytes, a word at a time (unaligned LDR/STR) then bytes.
///
/// # Safety
/// Both ranges are valid and do not overlap.
#[inline(always)]
unsafe fn copy_small(dst: *mut u8, src: *const u8, n: usize) {
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: the caller's ranges.
        unsafe { super::isa::store_u32(dst.add(i), load_u32(src.add(i))) };
        i += 4;
    }
    while i < n {
        // SAFETY: the caller's ranges.
        unsafe { *dst.add(i) = *src.add(i) };
        i += 1;
    }
}

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
unsafe fn stem_column(
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
unsafe fn stem_block(col: *mut i16, r0: *const u8, stride: usize, input_offset: i32) {
    for j in 0..4 {
        // SAFETY: pixel `j` starts 3 bytes after pixel `j - 1`.
        unsafe { stem_column(col, 4, j, r0.add(3 * j), stride, input_offset) };
    }
}

/// The padded path's im2col: the receptive field in natural tap order in
/// `buf` (padding and the taps past `kernel_h * kernel_w * in_c` as the
/// input zero point, i.e. 0 once offset), then converted four channels per
/// word like an aligned layer.
///
/// # Safety
/// As [`im2col`], and `k.taps <= PAD_MAX`, `k.full == k.taps`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn im2col_padded(
    col: *mut i16,
    k: Cols,
    j: usize,
    input: *const i8,
    dims: Dims,
    p: &Conv2dParams,
    oy: usize,
    ox: usize,
    buf: &mut [u32; PAD_MAX / 4],
) {
    let c = dims.c;
    let row_len = p.kernel_w * c;
    let x0 = ox * p.stride_w;
    let y0 = oy * p.stride_h;
    if c == 3
        && p.kernel_h == 3
        && p.kernel_w == 3
        && k.taps == 32
        && x0 >= p.pad_w
        && x0 - p.pad_w + 3 <= dims.w
        && y0 >= p.pad_h
        && y0 - p.pad_h + 3 <= dims.h
    {
        // The stem's interior pixels: the 27 taps are three runs of 9 bytes;
        // the 8 words of the padded column (taps 27..32 as the zero point)
        // are put together from unaligned loads inside the runs, then
        // converted as `put_taps` does.
        // SAFETY: rows `y0 - pad_h ..+ 3`, columns `x0 - pad_w ..+ 3` are in
        // the input, every load lies within one 9-byte run; the block holds
        // 8 groups of pixel `j`.
        unsafe {
            let r0 = input.add(((y0 - p.pad_h) * dims.w + x0 - p.pad_w) * 3) as *const u8;
            stem_column(col, k.n, j, r0, dims.w * 3, p.input_offset);
        }
        return;
    }
    let zp4 = ((-p.input_offset) as u8 as u32) * 0x0101_0101;
    for w in buf[..k.taps / 4].iter_mut() {
        *w = zp4;
    }
    let b = buf.as_mut_ptr() as *mut u8;
    let row_inside = x0 >= p.pad_w && x0 - p.pad_w + p.kernel_w <= dims.w;
    for ky in 0..p.kernel_h {
        let iy = (oy * p.stride_h + ky).wrapping_sub(p.pad_h);
        if iy >= dims.h {
            continue;
        }
        // SAFETY: pixels inside the input; `ky * row_len + row_len <= taps`.
        unsafe {
            let src = input.add(iy * dims.w * c) as *const u8;
            let dst = b.add(ky * row_len);
            if row_inside {
                copy_small(dst, src.add((x0 - p.pad_w) * c), row_len);
            } else {
                for kx in 0..p.kernel_w {
                    let ix = (x0 + kx).wrapping_sub(p.pad_w);
                    if ix < dims.w {
                        copy_small(dst.add(kx * c), src.add(ix * c), c);
                    }
                }
            }
        }
    }
    // SAFETY: `k.taps` values in `buf`; the caller's bounds on `col`.
    unsafe { put_taps(col, k, j, 0, k.taps, Some(b as *const i8), p.input_offset) };
}

/// The asm text of two tap groups of the 1 × 4 tile: one LDRD of two
/// weight words, eight LDRD of column pairs, four SXTB16, 16 SMLAD (29
/// instructions per 32 MACs).
#[cfg(armv7em)]
macro_rules! two_groups {
    () => {
        concat!(
            "ldrd {w}, {w1}, [{pw}], #8\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "sxtb16 {we}, {w}\n",
            "sxtb16 {w}, {w}, ror #8\n",
            "smlad {a0}, {we}, {x0}, {a0}\n",
            "smlad {a0}, {w}, {x1}, {a0}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a1}, {we}, {x0}, {a1}\n",
            "smlad {a1}, {w}, {x1}, {a1}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a2}, {we}, {x0}, {a2}\n",
            "smlad {a2}, {w}, {x1}, {a2}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a3}, {we}, {x0}, {a3}\n",
            "smlad {a3}, {w}, {x1}, {a3}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "sxtb16 {we}, {w1}\n",
            "sxtb16 {w1}, {w1}, ror #8\n",
            "smlad {a0}, {we}, {x0}, {a0}\n",
            "smlad {a0}, {w1}, {x1}, {a0}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a1}, {we}, {x0}, {a1}\n",
            "smlad {a1}, {w1}, {x1}, {a1}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a2}, {we}, {x0}, {a2}\n",
            "smlad {a2}, {w1}, {x1}, {a2}\n",
            "ldrd {x0}, {x1}, [{pc}], #8\n",
            "smlad {a3}, {we}, {x0}, {a3}\n",
            "smlad {a3}, {w1}, {x1}, {a3}\n",
        )
    };
}

/// The asm text of four tap groups of [`dot_1x4_x16`] (58 instructions per
/// 64 MACs without the loop).
#[cfg(armv7em)]
macro_rules! four_groups {
    () => {
        concat!(two_groups!(), two_groups!())
    };
}

/// `asm!` of a 1 × 4 dot-product loop over `text`, with the operands every
/// such loop uses: the filter and column pointers `pw`/`pc` (advanced), the
/// filter end, the four accumulators, and five scratch registers (`w`, `w1`,
/// `we`, `x0`, `x1`). A text that leaves an operand unused names it in an
/// `@` comment.
#[cfg(armv7em)]
macro_rules! dot_1x4_asm {
    ($pw:ident, $pc:ident, $end:ident, $a0:ident, $a1:ident, $a2:ident, $a3:ident; $($text:expr),* $(,)?) => {
        // SAFETY: the loop reads filter bytes from `pw` up to `end` (4-byte
        // aligned words) and four column halfword pairs per filter word
        // from `pc`, as the portable loop does; the callers guarantee both.
        unsafe {
            core::arch::asm!(
                $($text),*,
                pw = inout(reg) $pw,
                pc = inout(reg) $pc,
                end = in(reg) $end,
                a0 = inout(reg) $a0,
                a1 = inout(reg) $a1,
                a2 = inout(reg) $a2,
                a3 = inout(reg) $a3,
                w = out(reg) _,
                w1 = out(reg) _,
                we = out(reg) _,
                x0 = out(reg) _,
                x1 = out(reg) _,
                options(nostack, readonly),
            )
        }
    };
}

/// The 1 × 4 dot product over whole weight words, `pw..end`, in plain
/// Rust on the emulated instructions (the host's twin of the `asm!` loops
/// of [`dot_1x4`] and [`dot_1x4_x16`]).
///
/// # Safety
/// `pw..end` is readable (a multiple of 4 bytes); `pc` holds one 4-pixel
/// group (32 bytes, 4-byte aligned) per weight word.
#[cfg(not(armv7em))]
#[inline(always)]
unsafe fn dot_1x4_words(
    mut pw: *const u8,
    mut pc: *const u8,
    end: *const u8,
    acc: [i32; 4],
) -> [i32; 4] {
    let [mut a0, mut a1, mut a2, mut a3] = acc;
    while pw < end {
        // SAFETY: one weight word and one 4-pixel group (32 bytes) per step.
        unsafe {
            let wv = load_u32(pw);
            let (we, wo) = (sxtb16(wv), sxtb16_ror8(wv));
            a0 = smlad(we, col_word(pc), a0);
            a0 = smlad(wo, col_word(pc.add(4)), a0);
            a1 = smlad(we, col_word(pc.add(8)), a1);
            a1 = smlad(wo, col_word(pc.add(12)), a1);
            a2 = smlad(we, col_word(pc.add(16)), a2);
            a2 = smlad(wo, col_word(pc.add(20)), a2);
            a3 = smlad(we, col_word(pc.add(24)), a3);
            a3 = smlad(wo, col_word(pc.add(28)), a3);
            pw = pw.add(4);
            pc = pc.add(32);
        }
    }
    [a0, a1, a2, a3]
}

/// One output channel (filter row `w`) × four pixels of the block `col`.
///
/// # Safety
/// `w` holds `taps` values; `col` is a 4-pixel block of `k`.
#[inline(always)]
unsafe fn dot_1x4(w: *const i8, col: *const i16, k: Cols, acc: [i32; 4]) -> [i32; 4] {
    let [mut a0, mut a1, mut a2, mut a3] = acc;
    // Advanced by the `asm!` loops (the host's loop takes copies).
    #[cfg_attr(not(armv7em), allow(unused_mut))]
    let (mut pw, mut pc) = (w as *const u8, col as *const u8);
    // SAFETY: `full` filter values.
    let end = unsafe { pw.add(k.full) };
    // Two groups per step with LDRD of two weight words: filter rows start
    // 4-byte aligned (the blob aligns the filter, `taps % 4 == 0`) and the
    // group count is even in every 3x3 and 1x1 conv of Mini-ResNet.
    #[cfg(armv7em)]
    if k.full.is_multiple_of(16) && (w as usize).is_multiple_of(4) && pw < end {
        // Four groups per step (every 3x3 and 1x1 conv of Mini-ResNet has
        // a multiple of 16 taps): 60 instructions per 64 MACs.
        // SAFETY: as the two-group loop below.
        dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; "2:", four_groups!(), "cmp {pw}, {end}", "blo 2b");
    }
    #[cfg(armv7em)]
    if k.full.is_multiple_of(8) && (w as usize).is_multiple_of(4) && pw < end {
        // 29 instructions per 32 MACs plus the loop's CMP/BLO.
        // SAFETY: reads `full` filter bytes from `w` (4-byte aligned) and
        // `4 * full` column halfwords from `col` (4-byte aligned), as the
        // portable loop does.
        dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; "2:", two_groups!(), "cmp {pw}, {end}", "blo 2b");
    }
    #[cfg(armv7em)]
    if pw < end {
        // The same loop as the portable one below, scheduled by hand: one
        // weight word, four LDRD of column pairs, 8 SMLAD; 17 instructions
        // per 16 MACs.
        // SAFETY: reads `full` filter bytes from `w` and `4 * full` column
        // halfwords from `col` (4-byte aligned), as the portable loop does.
        unsafe {
            core::arch::asm!(
                "2:",
                "ldr {w}, [{pw}], #4",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "sxtb16 {we}, {w}",
                "sxtb16 {w}, {w}, ror #8",
                "smlad {a0}, {we}, {x0}, {a0}",
                "smlad {a0}, {w}, {x1}, {a0}",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "smlad {a1}, {we}, {x0}, {a1}",
                "smlad {a1}, {w}, {x1}, {a1}",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "smlad {a2}, {we}, {x0}, {a2}",
                "smlad {a2}, {w}, {x1}, {a2}",
                "ldrd {x0}, {x1}, [{pc}], #8",
                "smlad {a3}, {we}, {x0}, {a3}",
                "smlad {a3}, {w}, {x1}, {a3}",
                "cmp {pw}, {end}",
                "blo 2b",
                pw = inout(reg) pw,
                pc = inout(reg) pc,
                end = in(reg) end,
                a0 = inout(reg) a0,
                a1 = inout(reg) a1,
                a2 = inout(reg) a2,
                a3 = inout(reg) a3,
                w = out(reg) _,
                we = out(reg) _,
                x0 = out(reg) _,
                x1 = out(reg) _,
                options(nostack, readonly),
            );
        }
    }
    #[cfg(armv7em)]
    let _ = (pw, pc);
    #[cfg(not(armv7em))]
    {
        // SAFETY: `full` filter bytes from `pw`, their 4-pixel groups from `pc`.
        [a0, a1, a2, a3] = unsafe { dot_1x4_words(pw, pc, end, [a0, a1, a2, a3]) };
    }
    let tail = k.taps - k.full;
    for t in 0..tail {
        // SAFETY: tail taps of the row and of each pixel.
        unsafe {
            let wt = *w.add(k.full + t) as i32;
            let x = col.add(4 * k.full + t);
            a0 = a0.wrapping_add(wt * *x as i32);
            a1 = a1.wrapping_add(wt * *x.add(tail) as i32);
            a2 = a2.wrapping_add(wt * *x.add(2 * tail) as i32);
            a3 = a3.wrapping_add(wt * *x.add(3 * tail) as i32);
        }
    }
    [a0, a1, a2, a3]
}

/// Two output channels (rows `w0`, `w1`) × two pixels of the block
/// `col`: `[oc0·px0, oc0·px1, oc1·px0, oc1·px1]`.
///
/// # Safety
/// Two filter rows of `taps` values; `col` is a 2-pixel block of `k`.
#[inline(always)]
unsafe fn dot_2x2(
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

/// [`dot_1x4`] for a row of `full` taps, `full` a non-zero multiple of 16,
/// `w` 4-byte aligned: 4 groups when `H4` (`full & 16`), 8 more when `H8`
/// (`full & 32`), then a 16-group loop (2 loop instructions per 256 MACs).
/// The heads are chosen per layer, not tested per channel.
///
/// # Safety
/// `w` holds `full` values (4-byte aligned); `col` is a 4-pixel block of
/// `full` taps; `H4 == (full & 16 != 0)`, `H8 == (full & 32 != 0)`.
#[inline(always)]
unsafe fn dot_1x4_x16<const H4: bool, const H8: bool>(
    w: *const i8,
    col: *const i16,
    full: usize,
    acc: i32,
) -> [i32; 4] {
    debug_assert!(full > 0 && full.is_multiple_of(16) && (w as usize).is_multiple_of(4));
    debug_assert!(H4 == (full & 16 != 0) && H8 == (full & 32 != 0));
    let (mut a0, mut a1, mut a2, mut a3) = (acc, acc, acc, acc);
    // Advanced by the `asm!` loops (the host's loop takes copies).
    #[cfg_attr(not(armv7em), allow(unused_mut))]
    let (mut pw, mut pc) = (w as *const u8, col as *const u8);
    // SAFETY: `full` filter values.
    let end = unsafe { pw.add(full) };
    #[cfg(armv7em)]
    {
        if H4 {
            dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; four_groups!(), "@ {end}");
        }
        if H8 {
            dot_1x4_asm!(pw, pc, end, a0, a1, a2, a3; four_groups!(), four_groups!(), "@ {end}");
        }
        if full >= 64 {
            dot_1x4_asm!(
                pw, pc, end, a0, a1, a2, a3;
                "5:",
                four_groups!(),
                four_groups!(),
                four_groups!(),
                four_groups!(),
                "cmp {pw}, {end}",
                "blo 5b"
            );
        }
        let _ = (pw, pc, end);
    }
    #[cfg(not(armv7em))]
    {
        // SAFETY: `full` filter bytes from `pw`, their 4-pixel groups from `pc`.
        [a0, a1, a2, a3] = unsafe { dot_1x4_words(pw, pc, end, [a0, a1, a2, a3]) };
    }
    [a0, a1, a2, a3]
}

/// One output channel of the lean loops: its bias and folded
/// requantization, in one 16-byte record (`asm!` reads the fields at
/// offsets 0, 4, 8, 12).
#[derive(Clone, Copy)]
#[repr(C)]
struct LeanChannel {
    bias: i32,
    f: FoldedRequant,
}

// The offsets `store_4_folded` reads (`FoldedRequant` is `repr(C)`:
// multiplier, c, e; checked in `requant.rs`).
const _: () = assert!(
    core::mem::offset_of!(LeanChannel, bias) == 0
        && core::mem::offset_of!(LeanChannel, f) == 4
        && core::mem::size_of::<LeanChannel>() == 16
);

/// The four folded requantizations (no clamp) and stores of one channel's
/// sums `a` over a 4-pixel block, in one `asm!` block: 27 instructions.
/// Returns nothing; writes `q`, `q + out_c`, `q + 2 * out_c`, `q + 3 * out_c`.
///
/// # Safety
/// `r` is a valid [`LeanChannel`]; the four outputs are writable.
#[cfg(armv7em)]
#[inline(always)]
unsafe fn store_4_folded(a: [i32; 4], r: *const LeanChannel, q: *mut i8, out_c: usize) {
    let [a0, a1, a2, a3] = a;
    // SAFETY: reads the 16-byte record at `r`, writes the four outputs. No
    // `preserves_flags`: QADD and SSAT may set the Q flag.
    unsafe {
        core::arch::asm!(
            "ldrd {m}, {c}, [{r}, #4]",
            "ldr {e}, [{r}, #12]",
            folded_requant!("a0", "t"),
            "strb {a0}, [{q}]",
            folded_requant!("a1", "t"),
            "strb {a1}, [{q}, {oc}]",
            folded_requant!("a2", "t"),
            "strb {a2}, [{q}, {oc}, lsl #1]",
            folded_requant!("a3", "t"),
            "add {t}, {oc}, {oc}, lsl #1",
            "strb {a3}, [{q}, {t}]",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            a2 = inout(reg) a2 => _,
            a3 = inout(reg) a3 => _,
            r = in(reg) r,
            q = in(reg) q,
            oc = in(reg) out_c,
            m = out(reg) _,
            c = out(reg) _,
            e = out(reg) _,
            t = out(reg) _,
            options(nostack),
        );
    }
}

/// Every output channel of a full 4-pixel block when every channel is in
/// [`FoldedRequant`]'s domain and the rows are `taps` (a multiple of 16)
/// aligned values: one pointer walk over filter, bias and requantization,
/// no per-channel branches. `CLAMP_MAX`: the upper clamp is below 127.
///
/// # Safety
/// `filter` (the layer's, or the stem's padded copy) holds `out_c` rows of
/// `taps` values (4-byte aligned); `col` is a 4-pixel block of `taps` taps;
/// `o` points at 4 output pixels of `out_c`.
#[inline(never)]
unsafe fn block_1x4_folded<
    const CLAMP_MIN: bool,
    const CLAMP_MAX: bool,
    const H4: bool,
    const H8: bool,
>(
    layer: &Conv2d<'_>,
    filter: *const i8,
    rq: *const LeanChannel,
    col: *const i16,
    taps: usize,
    o: *mut i8,
    out_c: usize,
) {
    let p = &layer.params;
    let (min, max) = (p.act_min as i32, p.act_max as i32);
    let mut w = filter;
    let mut r = rq;
    let mut q = o;
    // SAFETY: `out_c` channels.
    let q_end = unsafe { o.add(out_c) };
    while q < q_end {
        // SAFETY: channel `q - o` of filter, bias, requantization and output.
        unsafe {
            let a = dot_1x4_x16::<H4, H8>(w, col, taps, (*r).bias);
            #[cfg(armv7em)]
            if !CLAMP_MIN && !CLAMP_MAX {
                store_4_folded(a, r, q, out_c);
                w = w.add(taps);
                r = r.add(1);
                q = q.add(1);
                continue;
            }
            let f = (*r).f;
            let req = |x: i32| -> i8 {
                let mut v = f.scale_sat8(x);
                if CLAMP_MIN {
                    v = v.max(min);
                }
                if CLAMP_MAX {
                    v = v.min(max);
                }
                v as i8
            };
            *q = req(a[0]);
            *q.add(out_c) = req(a[1]);
            *q.add(2 * out_c) = req(a[2]);
            *q.add(3 * out_c) = req(a[3]);
            w = w.add(taps);
            r = r.add(1);
            q = q.add(1);
        }
    }
}

/// [`block_1x4_folded`] with the inner loop's heads for `taps`.
///
/// # Safety
/// As [`block_1x4_folded`].
#[inline(always)]
unsafe fn lean_block<const CLAMP_MIN: bool, const CLAMP_MAX: bool>(
    layer: &Conv2d<'_>,
    filter: *const i8,
    rq: *const LeanChannel,
    col: *const i16,
    taps: usize,
    o: *mut i8,
    out_c: usize,
) {
    // SAFETY: the caller's; the heads match `taps`.
    unsafe {
        match (taps & 16 != 0, taps & 32 != 0) {
            (false, false) => block_1x4_folded::<CLAMP_MIN, CLAMP_MAX, false, false>(
                layer, filter, rq, col, taps, o, out_c,
            ),
            (true, false) => block_1x4_folded::<CLAMP_MIN, CLAMP_MAX, true, false>(
                layer, filter, rq, col, taps, o, out_c,
            ),
            (false, true) => block_1x4_folded::<CLAMP_MIN, CLAMP_MAX, false, true>(
                layer, filter, rq, col, taps, o, out_c,
            ),
            (true, true) => block_1x4_folded::<CLAMP_MIN, CLAMP_MAX, true, true>(
                layer, filter, rq, col, taps, o, out_c,
            ),
        }
    }
}

/// Most channels outside [`FoldedRequant`]'s domain a lean loop takes
/// (e.g. a nearly dead channel whose tiny scale needs a shift below -21):
/// it runs them with a placeholder requantization, then recomputes them.
const MAX_OUTLIERS: usize = 8;

/// The channels of a layer outside [`FoldedRequant`]'s domain.
struct Outliers {
    idx: [u8; MAX_OUTLIERS],
    n: usize,
}

impl Outliers {
    /// `None` when there are more than [`MAX_OUTLIERS`], or more than one
    /// channel in 8 (the recomputation would cost more than it saves), or
    /// more than [`LEAN_MAX_C`] channels.
    fn of(layer: &Conv2d<'_>) -> Option<Self> {
        let out_c = layer.requant.multiplier.len();
        if out_c > LEAN_MAX_C {
            return None;
        }
        let mut o = Outliers {
            idx: [0; MAX_OUTLIERS],
            n: 0,
        };
        for (oc, (&m, &s)) in layer
            .requant
            .multiplier
            .iter()
            .zip(layer.requant.shift)
            .enumerate()
        {
            if !FoldedRequant::accepts(m, s) {
                if o.n == MAX_OUTLIERS || 8 * (o.n + 1) > out_c {
                    return None;
                }
                o.idx[o.n] = oc as u8;
                o.n += 1;
            }
        }
        Some(o)
    }

    fn channels(&self) -> &[u8] {
        &self.idx[..self.n]
    }

    /// Writes the lean loops' requantization table, `table[..out_c]`: every
    /// channel folded, the outliers as a placeholder.
    fn fill(&self, layer: &Conv2d<'_>, table: &mut [MaybeUninit<LeanChannel>]) {
        let requant = layer.requant.multiplier.iter().zip(layer.requant.shift);
        for ((r, (&m, &s)), &bias) in table.iter_mut().zip(requant).zip(layer.bias) {
            let f = if FoldedRequant::accepts(m, s) {
                FoldedRequant::new_unchecked(m, (-s) as u32, layer.params.output_offset)
            } else {
                FoldedRequant::PLACEHOLDER
            };
            r.write(LeanChannel { bias, f });
        }
    }

    /// Channel `oc`'s four sums over the block `col` (lean rows) and its
    /// exact requantization.
    ///
    /// # Safety
    /// `oc` is a channel of `layer`, whose rows are `taps` (a multiple of
    /// 16) 4-byte aligned values; `col` is a 4-pixel block of them.
    #[inline(always)]
    unsafe fn sums(
        layer: &Conv2d<'_>,
        oc: usize,
        col: *const i16,
        taps: usize,
    ) -> ([i32; 4], ChannelRequant) {
        let p = &layer.params;
        let k = Cols {
            n: 4,
            taps,
            full: taps,
            row: taps,
        };
        // SAFETY: the caller's.
        unsafe {
            let b = *layer.bias.get_unchecked(oc);
            let a = dot_1x4(layer.filter.as_ptr().add(oc * taps), col, k, [b; 4]);
            let r = ChannelRequant::new(
                *layer.requant.multiplier.get_unchecked(oc),
                *layer.requant.shift.get_unchecked(oc),
                p.output_offset,
                p.act_min,
                p.act_max,
            );
            (a, r)
        }
    }

    /// Recomputes the outliers' outputs of a full 4-pixel block that a lean
    /// loop wrote with the placeholder.
    ///
    /// # Safety
    /// As [`sums`](Self::sums); `o` points at 4 output pixels of `out_c`.
    #[inline(never)]
    unsafe fn fix(
        &self,
        layer: &Conv2d<'_>,
        col: *const i16,
        taps: usize,
        o: *mut i8,
        out_c: usize,
    ) {
        for &oc in self.channels() {
            let oc = oc as usize;
            // SAFETY: the caller's.
            unsafe {
                let (a, r) = Self::sums(layer, oc, col, taps);
                for (j, &aj) in a.iter().enumerate() {
                    *o.add(j * out_c + oc) = r.apply(aj);
                }
            }
        }
    }
}

/// [`lean_block`] with the clamps the layer's activation range needs.
///
/// # Safety
/// As [`block_1x4_folded`].
#[inline(always)]
unsafe fn lean_block_clamped(
    layer: &Conv2d<'_>,
    filter: *const i8,
    rq: *const LeanChannel,
    col: *const i16,
    taps: usize,
    o: *mut i8,
    out_c: usize,
) {
    let p = &layer.params;
    // SAFETY: the caller's.
    unsafe {
        match (p.act_min != i8::MIN, p.act_max != i8::MAX) {
            (false, false) => lean_block::<false, false>(layer, filter, rq, col, taps, o, out_c),
            (true, false) => lean_block::<true, false>(layer, filter, rq, col, taps, o, out_c),
            (false, true) => lean_block::<false, true>(layer, filter, rq, col, taps, o, out_c),
            (true, true) => lean_block::<true, true>(layer, filter, rq, col, taps, o, out_c),
        }
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
unsafe fn block_1x4(
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

/// The fast convolution. The caller has validated everything
/// [`conv2d_s8`](crate::kernels::conv2d_s8) validates: lengths of input,
/// output, filter, bias, requantization, a scratch of at least two columns,
/// and parameter ranges. With four columns of scratch
/// (`4 * kernel_h * kernel_w * in_c`) it runs the 1 × 4 tile, else 2 × 2;
/// with room for the widened input after the block as well
/// ([`conv2d_s8_fast_scratch_len`](crate::kernels::conv2d_s8_fast_scratch_len)),
/// a kernel larger than 1x1 gathers its blocks from that.
/// Returns `false` (and does nothing) when the scratch is not 4-byte aligned
/// and has no element to spare for aligning it, or a multiplier is
/// `i32::MIN`; the caller then runs the reference kernel.
pub(crate) fn conv2d_s8_dsp(
    layer: &Conv2d<'_>,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
    scratch: &mut [i16],
) -> bool {
    let p = &layer.params;
    let taps = p.kernel_h * p.kernel_w * input_dims.c;
    // Columns start 4-byte aligned, so column words are plain aligned loads.
    let skip = scratch.as_ptr().align_offset(4);
    // A multiplier of i32::MIN (never exported: multipliers are in
    // [2^30, 2^31)) needs the saturating case the fast requantization skips.
    if skip > 1 || scratch.len() < skip + 2 * taps || layer.requant.multiplier.contains(&i32::MIN) {
        return false;
    }
    let scratch = &mut scratch[skip..];
    // Taps not a multiple of 4 (the 3-channel stem): pad the columns to a
    // whole group when they fit, so every tap goes through SMLAD.
    let folded = layer
        .requant
        .multiplier
        .iter()
        .zip(layer.requant.shift)
        .all(|(&m, &s)| FoldedRequant::accepts(m, s));
    let out_c = output_dims.c;
    // The stem (3 channels, 27 taps): rows padded to a multiple of 16 taps
    // in an aligned stack copy of the filter with zeros after each row, so
    // the lean channel loop runs it.
    let r16 = taps.next_multiple_of(16);
    let stem = folded
        && !taps.is_multiple_of(4)
        && r16 <= PAD_MAX
        && out_c * r16 <= STEM_FILTER_MAX
        && scratch.len() >= 4 * r16;
    let rounded = if stem { r16 } else { taps.next_multiple_of(4) };
    let padded = rounded != taps && rounded <= PAD_MAX && scratch.len() >= 2 * rounded;
    let ct = if padded { rounded } else { taps };
    let n = if scratch.len() >= 4 * ct { 4 } else { 2 };
    let k = Cols {
        n,
        taps: ct,
        full: ct & !3,
        row: taps,
    };
    let mut buf = [0i8; PAD_MAX];
    let mut cols_buf = [0u32; PAD_MAX / 4];
    // Zeroed and filled only for the stem.
    let mut stem_filter = MaybeUninit::<[u32; STEM_FILTER_MAX / 4]>::uninit();
    if stem {
        let b = stem_filter.as_mut_ptr() as *mut i8;
        // SAFETY: `out_c * r16 <= STEM_FILTER_MAX` bytes; row `oc` of the filter.
        unsafe {
            core::ptr::write_bytes(b, 0, out_c * r16);
            for oc in 0..out_c {
                core::ptr::copy_nonoverlapping(
                    layer.filter.as_ptr().add(oc * taps),
                    b.add(oc * r16),
                    taps,
                );
            }
        }
    }
    let pixels = output_dims.h * output_dims.w;
    debug_assert!(input.len() == input_dims.len() && output.len() == pixels * out_c);
    debug_assert!(scratch.len() >= 2 * taps && layer.filter.len() == out_c * taps);
    debug_assert!(layer.bias.len() == out_c && layer.requant.shift.len() == out_c);
    let col = scratch.as_mut_ptr();
    let (inp, out) = (input.as_ptr(), output.as_mut_ptr());
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
    // The lean channel loop: folded requantization (a few outlier channels
    // recomputed after each block), unpadded rows of a multiple of 16 taps,
    // 4-byte aligned (every 3x3 and 1x1 conv here).
    let outliers = Outliers::of(layer);
    let lean = n == 4
        && !padded
        && taps > 0
        && taps.is_multiple_of(16)
        && layer.filter.as_ptr().align_offset(4) == 0
        && outliers.is_some();
    let outliers = outliers.unwrap_or(Outliers {
        idx: [0; MAX_OUTLIERS],
        n: 0,
    });
    // `out_c * 16 <= STEM_FILTER_MAX`: the stem's channels fit the table
    // (and, `folded`, it has no outliers).
    debug_assert!(!stem || (out_c <= LEAN_MAX_C && outliers.n == 0));
    // The channels' folded requantizations, prepared once per layer
    // (`table[..out_c]` is written and read only when `lean || stem`).
    let mut table = [const { MaybeUninit::<LeanChannel>::uninit() }; LEAN_MAX_C];
    if lean || stem {
        outliers.fill(layer, &mut table[..out_c]);
    }
    let rq_table = table.as_ptr() as *const LeanChannel;
    let fix = outliers.n > 0;
    let (lean, lean_filter) = if stem {
        (true, stem_filter.as_ptr() as *const i8)
    } else {
        (lean, layer.filter.as_ptr())
    };
    // The stem's fast blocks (then the lean loop without clamps).
    let stem_fast = stem
        && n == 4
        && k.taps == 32
        && input_dims.c == 3
        && p.kernel_h == 3
        && p.kernel_w == 3
        && p.stride_h == 1
        && p.stride_w == 1
        && p.act_min == i8::MIN
        && p.act_max == i8::MAX;
    // Interior 4-pixel blocks of the lean path gathered without per-pixel
    // checks (then the lean loop without clamps).
    let block_rows = lean
        && !stem
        && !padded
        && n == 4
        && p.kernel_w * input_dims.c > 0
        && (p.kernel_w * input_dims.c).is_multiple_of(4)
        && p.kernel_h * p.kernel_w * input_dims.c == k.full
        && p.act_min == i8::MIN
        && p.act_max == i8::MAX;
    #[cfg(not(armv7em))]
    let _ = block_rows;
    // The widened-input path for kernels larger than 1x1: the input is
    // converted once (each byte is read by up to `kernel_h * kernel_w`
    // pixels), then every block, borders included, is gathered by copying
    // word pairs. The block sits first in the scratch, the widened input
    // after it.
    let wide = lean
        && !stem
        && n == 4
        && p.kernel_h * p.kernel_w > 1
        && input_dims.c.is_multiple_of(4)
        && scratch.len() >= 4 * taps + wide_len(input_dims, p);
    if wide {
        let (c, ww) = (input_dims.c, input_dims.w + 2 * p.pad_w);
        // SAFETY: the scratch holds the block (`4 * taps`) and the widened
        // input after it, both 4-byte aligned (`taps` is a multiple of 16).
        let wbuf = unsafe { col.add(4 * taps) };
        // SAFETY: `wbuf` holds `wide_len` elements; `c % 4 == 0`.
        unsafe { widen(wbuf, inp, input_dims, p) };
        let (f, r) = (lean_filter, rq_table);
        let mut pix = 0;
        while pix < pixels {
            let valid = (pixels - pix).min(4);
            for j in 0..4 {
                // A short last block repeats its last pixel; those outputs
                // are dropped.
                let q = pix + j.min(valid - 1);
                let (oy, ox) = (q / output_dims.w, q % output_dims.w);
                // SAFETY: output pixel `(oy, ox)` reads widened rows
                // `oy * stride_h ..+ kernel_h` and columns `ox * stride_w
                // ..+ kernel_w`, inside the widened input (validated output
                // size); slot `4 * j` of the block.
                unsafe {
                    let s = wbuf.add((oy * p.stride_h * ww + ox * p.stride_w) * c);
                    gather_wide(col.add(4 * j), s, p.kernel_h, p.kernel_w * c, ww * c);
                }
            }
            // SAFETY: pixels `pix..pix + valid` are in the output; the
            // filter, bias and requantization hold `out_c` channels; `lean`:
            // the first `out_c` table entries are written.
            unsafe {
                let o = out.add(pix * out_c);
                if valid == 4 {
                    lean_block_clamped(layer, f, r, col, taps, o, out_c);
                    if fix {
                        outliers.fix(layer, col, taps, o, out_c);
                    }
                } else {
                    block_1x4(layer, col, k, o, out_c, valid, &mut buf, folded);
                }
            }
            pix += 4;
        }
        return true;
    }
    let mut pix = 0;
    while pix < pixels {
        let valid = (pixels - pix).min(n);
        if stem_fast && valid == 4 {
            let (oy, ox) = (pix / output_dims.w, pix % output_dims.w);
            if ox + 4 <= output_dims.w
                && ox >= p.pad_w
                && ox + 3 - p.pad_w + 3 <= input_dims.w
                && oy >= p.pad_h
                && oy - p.pad_h + 3 <= input_dims.h
            {
                // SAFETY: the four receptive fields are inside the input
                // (stride 1); the block holds 4 columns of 32 taps.
                unsafe {
                    let r0 =
                        inp.add(((oy - p.pad_h) * input_dims.w + ox - p.pad_w) * 3) as *const u8;
                    stem_block(col, r0, input_dims.w * 3, p.input_offset);
                }
                // SAFETY: pixels `pix..pix + 4` are in the output.
                let o = unsafe { out.add(pix * out_c) };
                // SAFETY: as the lean call below.
                unsafe {
                    lean_block::<false, false>(layer, lean_filter, rq_table, col, k.taps, o, out_c)
                };
                pix += n;
                continue;
            }
        }
        #[cfg(armv7em)]
        if block_rows && valid == 4 {
            let (oy, ox) = (pix / output_dims.w, pix % output_dims.w);
            let (y0, x0) = (oy * p.stride_h, ox * p.stride_w);
            if ox + 4 <= output_dims.w
                && x0 >= p.pad_w
                && x0 + 3 * p.stride_w - p.pad_w + p.kernel_w <= input_dims.w
                && y0 >= p.pad_h
                && y0 - p.pad_h + p.kernel_h <= input_dims.h
            {
                let c = input_dims.c;
                let row_len = p.kernel_w * c;
                let off2 = (p.input_offset as u16 as u32) * 0x0001_0001;
                // SAFETY: the four pixels' receptive fields are inside the
                // input (one output row, `stride_w * c` bytes apart); pixel
                // `j`'s column starts at slot `4 * j` of the block.
                unsafe {
                    let src =
                        inp.add(((y0 - p.pad_h) * input_dims.w + x0 - p.pad_w) * c) as *const u8;
                    for j in 0..4 {
                        gather_rows(
                            col.add(4 * j) as *mut u32,
                            src.add(j * p.stride_w * c),
                            p.kernel_h,
                            row_len,
                            input_dims.w * c - row_len,
                            off2,
                        );
                    }
                }
                // SAFETY: pixels `pix..pix + 4` are in the output.
                let o = unsafe { out.add(pix * out_c) };
                // SAFETY: as the lean call below (`block_rows` implies `lean`).
                unsafe {
                    lean_block::<false, false>(layer, lean_filter, rq_table, col, k.taps, o, out_c)
                };
                pix += n;
                continue;
            }
        }
        for j in 0..n {
            // A short last block repeats its last pixel; those outputs are dropped.
            let q = pix + j.min(valid - 1);
            let (oy, ox) = (q / output_dims.w, q % output_dims.w);
            // SAFETY: the block holds `n` columns; `q` is an output pixel.
            unsafe {
                if padded {
                    im2col_padded(col, k, j, inp, input_dims, p, oy, ox, &mut cols_buf);
                } else {
                    im2col(col, k, j, inp, input_dims, p, oy, ox);
                }
            };
        }
        // SAFETY: pixels `pix..pix + valid` are in the output.
        let o = unsafe { out.add(pix * out_c) };
        if n == 4 {
            // SAFETY: the filter, bias and requantization hold `out_c`
            // channels; the block holds 4 columns; pixels `pix..pix + valid`
            // are in the output.
            unsafe {
                if lean && valid == 4 {
                    // `lean`: the first `out_c` entries are written.
                    let (f, r) = (lean_filter, rq_table);
                    lean_block_clamped(layer, f, r, col, k.taps, o, out_c);
                    if fix {
                        outliers.fix(layer, col, k.taps, o, out_c);
                    }
                } else {
                    block_1x4(layer, col, k, o, out_c, valid, &mut buf, folded);
                }
            }
        } else {
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
        pix += n;
    }
    true
}

/// One output channel × the two pixels of a 2-pixel block: the 1 × 2 tile,
/// for the odd last channel of the 2 × 2 tile.
///
/// # Safety
/// `w` holds `taps` values; `col` is a 2-pixel block of `k`.
#[inline(always)]
unsafe fn dot_1x2(w: *const i8, col: *const i16, k: Cols, b: i32) -> [i32; 2] {
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
