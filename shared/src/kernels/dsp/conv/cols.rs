//! im2col: the receptive fields of a block of output pixels gathered into
//! interleaved `i16` columns with the input offset applied (the column
//! layout is described in the [parent module](super)), pixel by pixel,
//! plus the padded path's variant and its filter rows.

use super::stem::stem_column;
use crate::kernels::dsp::isa::{load_u32, sadd16, sxtb16, sxtb16_ror8};
use crate::kernels::{Conv2dParams, Dims};

/// A column word (4-byte aligned: the kernel aligns the scratch).
///
/// # Safety
/// `p` is 4-byte aligned and readable for 4 bytes.
#[inline(always)]
pub(super) unsafe fn col_word(p: *const u8) -> u32 {
    // SAFETY: the caller's guarantee.
    unsafe { (p as *const u32).read() }
}

/// Geometry of one im2col block.
#[derive(Clone, Copy)]
pub(super) struct Cols {
    /// Pixels per block (2 or 4).
    pub(super) n: usize,
    /// Taps per column: the layer's taps, or rounded up to a multiple of 4
    /// on the padded path.
    pub(super) taps: usize,
    /// Taps in whole groups of four.
    pub(super) full: usize,
    /// The layer's taps: the filter's row stride.
    pub(super) row: usize,
}

impl Cols {
    /// Offset of flat tap `t` of pixel `j`.
    #[inline(always)]
    pub(super) fn slot(&self, t: usize, j: usize) -> usize {
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
#[cfg(armv7em)]
pub(super) use widen_word;

/// The portable twin of `widen_word!`: writes the two column words of
/// `x` at `d`.
///
/// # Safety
/// `d ..+ 2` words are writable (4-byte aligned).
#[inline(always)]
pub(super) unsafe fn put_word(d: *mut u32, x: u32, off2: u32) {
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
pub(super) unsafe fn put_taps(
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
pub(super) unsafe fn gather_rows(
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
pub(super) unsafe fn im2col(
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

/// Longest padded column the padded path handles (stack buffers).
pub(super) const PAD_MAX: usize = 256;

/// Filter row `oc`, readable for `k.taps` bytes: in place, or (on the padded
/// path, for the last rows, whose padded read would run past the filter)
/// copied into `buf` with zeros after it.
///
/// # Safety
/// `oc` is a channel of `filter`; on the padded path `k.taps <= PAD_MAX`.
#[inline(always)]
pub(super) unsafe fn row_ptr(
    filter: &[i8],
    oc: usize,
    k: Cols,
    buf: &mut [i8; PAD_MAX],
) -> *const i8 {
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
pub(super) unsafe fn copy_small(dst: *mut u8, src: *const u8, n: usize) {
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: the caller's ranges.
        unsafe { crate::kernels::dsp::isa::store_u32(dst.add(i), load_u32(src.add(i))) };
        i += 4;
    }
    while i < n {
        // SAFETY: the caller's ranges.
        unsafe { *dst.add(i) = *src.add(i) };
        i += 1;
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
pub(super) unsafe fn im2col_padded(
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
