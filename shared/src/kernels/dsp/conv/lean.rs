//! [`ConvPath::Lean`](super::ConvPath::Lean) and the lean channel loop
//! it shares with the wide and stem paths: every output channel of a full
//! 4-pixel block in one pointer walk over filter, bias and a table of
//! [`FoldedRequant`]s prepared once per layer, no per-channel branches; a
//! layer with a few channels outside that domain (a nearly dead channel
//! whose shift is below -21) still takes it, and those channels are
//! recomputed exactly after each block ([`Outliers`]).

#[cfg(armv7em)]
use super::cols::gather_rows;
use super::cols::{Cols, PAD_MAX};
use super::dot::{dot_1x4, dot_1x4_x16};
use super::tile1x4::block_1x4;
use super::{ConvIo, ConvPlan};
#[cfg(armv7em)]
use crate::kernels::dsp::requant::folded_requant;
use crate::kernels::dsp::requant::{ChannelRequant, FoldedRequant};
use crate::kernels::Conv2d;
use core::mem::MaybeUninit;

/// Runs a layer planned [`ConvPath::Lean`](super::ConvPath::Lean) (`rows`
/// as planned; used on the MCU only).
///
/// # Safety
/// `io` is valid for the layer; the plan is `Lean` for it.
pub(super) unsafe fn run(io: &ConvIo<'_, '_>, plan: &ConvPlan, rows: bool) {
    let layer = io.layer;
    let (out_c, col, k) = (io.out_dims.c, io.col, plan.k);
    let mut table = [const { MaybeUninit::<LeanChannel>::uninit() }; LEAN_MAX_C];
    plan.outliers.fill(layer, &mut table[..out_c]);
    let (f, r) = (layer.filter.as_ptr(), table.as_ptr() as *const LeanChannel);
    let mut buf = [0i8; PAD_MAX];
    #[cfg(not(armv7em))]
    let _ = rows;
    let fix = (plan.outliers.n > 0).then_some(&plan.outliers);
    let (pixels, out) = (io.pixels(), io.output);
    let mut pix = 0;
    while pix < pixels {
        let valid = (pixels - pix).min(4);
        // SAFETY: as below; `rows`: the plan's conditions.
        #[cfg(armv7em)]
        if rows && valid == 4 && unsafe { gather_interior(io, pix) } {
            // SAFETY: pixels `pix..pix + 4` are in the output; the table
            // is written.
            unsafe {
                let o = out.add(pix * out_c);
                lean_block::<false, false>(layer, f, r, col, k.taps, o, out_c);
            }
            pix += 4;
            continue;
        }
        // SAFETY: the block holds 4 columns; pixels `pix..pix + valid` are
        // in the output; the table is written.
        unsafe {
            io.gather_block_outlined(k, pix, valid, None);
            let o = out.add(pix * out_c);
            if valid == 4 {
                full_block(layer, f, r, col, k.taps, o, out_c, fix);
            } else {
                block_1x4(layer, col, k, o, out_c, valid, &mut buf, plan.folded);
            }
        }
        pix += 4;
    }
}

/// Gathers the 4-pixel block at output pixel `pix` when all four lie in
/// one output row with their receptive fields inside the input: each
/// pixel's kernel rows in one `asm!` rows loop. Returns whether it did.
///
/// # Safety
/// `io` is valid; the scratch holds a 4-pixel block of the layer's taps (a
/// multiple of 16); `kernel_w * in_c` is a multiple of 4; `pix + 4` pixels
/// are in the output.
#[cfg(armv7em)]
#[inline(always)]
unsafe fn gather_interior(io: &ConvIo<'_, '_>, pix: usize) -> bool {
    let (p, dims) = (&io.layer.params, io.in_dims);
    let (oy, ox) = (pix / io.out_dims.w, pix % io.out_dims.w);
    let (y0, x0) = (oy * p.stride_h, ox * p.stride_w);
    if !(ox + 4 <= io.out_dims.w
        && x0 >= p.pad_w
        && x0 + 3 * p.stride_w - p.pad_w + p.kernel_w <= dims.w
        && y0 >= p.pad_h
        && y0 - p.pad_h + p.kernel_h <= dims.h)
    {
        return false;
    }
    let c = dims.c;
    let row_len = p.kernel_w * c;
    let off2 = (p.input_offset as u16 as u32) * 0x0001_0001;
    // SAFETY: the four pixels' receptive fields are inside the input (one
    // output row, `stride_w * c` bytes apart); pixel `j`'s column starts at
    // slot `4 * j` of the block.
    unsafe {
        let src = io.input.add(((y0 - p.pad_h) * dims.w + x0 - p.pad_w) * c) as *const u8;
        for j in 0..4 {
            gather_rows(
                io.col.add(4 * j) as *mut u32,
                src.add(j * p.stride_w * c),
                p.kernel_h,
                row_len,
                dims.w * c - row_len,
                off2,
            );
        }
    }
    true
}

/// One full 4-pixel block of the lean loop: every channel with the clamps
/// the layer needs, then the outlier channels (`outliers`, when it has
/// any) recomputed.
///
/// # Safety
/// As [`block_1x4_folded`]; the outliers' rows are the layer's filter.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn full_block(
    layer: &Conv2d<'_>,
    filter: *const i8,
    rq: *const LeanChannel,
    col: *const i16,
    taps: usize,
    o: *mut i8,
    out_c: usize,
    outliers: Option<&Outliers>,
) {
    // SAFETY: the caller's.
    unsafe {
        lean_block_clamped(layer, filter, rq, col, taps, o, out_c);
        if let Some(outliers) = outliers {
            outliers.fix(layer, col, taps, o, out_c);
        }
    }
}

/// Most output channels of the lean channel loop (its table of prepared
/// requantizations is a stack buffer).
pub(super) const LEAN_MAX_C: usize = 128;

/// One output channel of the lean loops: its bias and folded
/// requantization, in one 16-byte record (`asm!` reads the fields at
/// offsets 0, 4, 8, 12).
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct LeanChannel {
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
pub(super) unsafe fn store_4_folded(a: [i32; 4], r: *const LeanChannel, q: *mut i8, out_c: usize) {
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
pub(super) unsafe fn block_1x4_folded<
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
pub(super) unsafe fn lean_block<const CLAMP_MIN: bool, const CLAMP_MAX: bool>(
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
pub(super) const MAX_OUTLIERS: usize = 8;

/// The channels of a layer outside [`FoldedRequant`]'s domain.
pub(super) struct Outliers {
    idx: [u8; MAX_OUTLIERS],
    pub(super) n: usize,
}

impl Outliers {
    /// No outliers.
    pub(super) const NONE: Outliers = Outliers {
        idx: [0; MAX_OUTLIERS],
        n: 0,
    };

    /// `None` when there are more than [`MAX_OUTLIERS`], or more than one
    /// channel in 8 (the recomputation would cost more than it saves), or
    /// more than [`LEAN_MAX_C`] channels.
    pub(super) fn of(layer: &Conv2d<'_>) -> Option<Self> {
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
    pub(super) fn fill(&self, layer: &Conv2d<'_>, table: &mut [MaybeUninit<LeanChannel>]) {
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
pub(super) unsafe fn lean_block_clamped(
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
