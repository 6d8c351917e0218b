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
//!
//! **The plan.** [`ConvPlan::new`] decides once per call, from the layer's
//! shape, requantization and the scratch it is given, which [`ConvPath`]
//! the layer takes; [`conv2d_s8_dsp`] then runs that path's loop, one file
//! each: [`wide`], [`stem`], [`lean`], [`tile1x4`], [`tile2x2`]. The
//! building blocks they share are [`cols`] (im2col) and [`dot`] (the SMLAD
//! tiles). The plan is made per call rather than at model `parse` time:
//! the path depends on the caller's scratch (its length and alignment),
//! which `conv2d_s8` only sees at the call, and the model keeps no
//! per-layer state (it decodes layers from the blob on demand); making the
//! plan costs one pass over the layer's requantization, as it did before.

mod cols;
mod dot;
mod lean;
mod stem;
mod tile1x4;
mod tile2x2;
mod wide;

pub(crate) use wide::wide_len;

use super::requant::FoldedRequant;
use crate::kernels::{Conv2d, Dims};
use cols::{im2col, im2col_padded, Cols, PAD_MAX};
use lean::Outliers;
use stem::STEM_FILTER_MAX;

/// Which loop a conv layer runs: chosen by [`ConvPlan::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConvPath {
    /// Not run here: a multiplier is `i32::MIN` (never exported; it needs
    /// the saturating case the fast requantization skips) or the scratch
    /// holds less than two columns. The caller runs the reference kernel.
    Reference,
    /// A kernel larger than 1x1 on a multiple of 4 channels with scratch
    /// for the widened input ([`wide_len`]): the input is converted to
    /// `i16` once, every block is gathered by copying word pairs, and the
    /// lean channel loop runs it ([`wide`]).
    Wide,
    /// Taps not a multiple of 4 (the 3-channel stem), every channel in
    /// [`FoldedRequant`]'s domain: the
    /// filter rows padded to a multiple of 16 taps in a stack copy, so the
    /// lean channel loop runs it ([`stem`]). `blocks`: a 3x3x3 stride-1
    /// unclamped layer whose interior 4-pixel blocks are built from
    /// unaligned loads ([`stem::stem_block`]).
    Stem {
        /// Interior blocks by [`stem::stem_block`].
        blocks: bool,
    },
    /// The lean channel loop (folded requantization, at most a few
    /// outlier channels, rows of a multiple of 16 aligned taps) on blocks
    /// gathered pixel by pixel ([`lean`]). `rows`: an unclamped layer whose
    /// kernel rows are whole words, whose interior blocks are gathered in
    /// one `asm!` rows loop per pixel (on the MCU).
    Lean {
        /// Interior blocks by `cols::gather_rows` (MCU only).
        rows: bool,
    },
    /// The 1 × 4 tile with a requantization per channel ([`tile1x4`]);
    /// `padded`: taps not a multiple of 4, columns padded to whole groups.
    Tile1x4 {
        /// Columns padded to a multiple of 4 taps.
        padded: bool,
    },
    /// Scratch for only two columns: the 2 × 2 tile ([`tile2x2`]);
    /// `padded` as for [`ConvPath::Tile1x4`].
    Tile2x2 {
        /// Columns padded to a multiple of 4 taps.
        padded: bool,
    },
}

/// A conv layer's path and the facts its loop needs, decided before any
/// output is written.
pub(crate) struct ConvPlan {
    /// The path.
    pub(crate) path: ConvPath,
    /// Block geometry (pixels per block, column taps).
    k: Cols,
    /// Every channel in `FoldedRequant`'s domain.
    folded: bool,
    /// The lean loops' outlier channels (none on the other paths).
    outliers: Outliers,
}

impl ConvPlan {
    /// The plan of `layer` on `input_dims` into `out_c` channels with an
    /// aligned scratch of `scratch_len` elements.
    pub(crate) fn new(
        layer: &Conv2d<'_>,
        input_dims: Dims,
        out_c: usize,
        scratch_len: usize,
    ) -> Self {
        let p = &layer.params;
        let taps = p.kernel_h * p.kernel_w * input_dims.c;
        let mut plan = ConvPlan {
            path: ConvPath::Reference,
            k: Cols {
                n: 2,
                taps,
                full: taps & !3,
                row: taps,
            },
            folded: false,
            outliers: Outliers::NONE,
        };
        if scratch_len < 2 * taps || layer.requant.multiplier.contains(&i32::MIN) {
            return plan;
        }
        plan.folded = layer
            .requant
            .multiplier
            .iter()
            .zip(layer.requant.shift)
            .all(|(&m, &s)| FoldedRequant::accepts(m, s));
        let unclamped = p.act_min == i8::MIN && p.act_max == i8::MAX;
        // Taps not a multiple of 4 (the 3-channel stem): pad the columns to
        // a whole group when they fit, so every tap goes through SMLAD; the
        // stem pads its rows to a multiple of 16 in a stack copy of the
        // filter, so the lean channel loop runs it.
        let r16 = taps.next_multiple_of(16);
        let stem = plan.folded
            && !taps.is_multiple_of(4)
            && r16 <= PAD_MAX
            && out_c * r16 <= STEM_FILTER_MAX
            && scratch_len >= 4 * r16;
        let rounded = if stem { r16 } else { taps.next_multiple_of(4) };
        let padded = rounded != taps && rounded <= PAD_MAX && scratch_len >= 2 * rounded;
        let ct = if padded { rounded } else { taps };
        let n = if scratch_len >= 4 * ct { 4 } else { 2 };
        plan.k = Cols {
            n,
            taps: ct,
            full: ct & !3,
            row: taps,
        };
        if stem {
            // `stem` implies `padded` and `n == 4`; `folded`: no outliers.
            let blocks = ct == 32
                && input_dims.c == 3
                && p.kernel_h == 3
                && p.kernel_w == 3
                && p.stride_h == 1
                && p.stride_w == 1
                && unclamped;
            plan.path = ConvPath::Stem { blocks };
            return plan;
        }
        // The lean channel loop: folded requantization (a few outlier
        // channels recomputed after each block), unpadded rows of a
        // multiple of 16 taps, 4-byte aligned (every 3x3 and 1x1 conv here).
        let outliers = Outliers::of(layer);
        let lean = n == 4
            && !padded
            && taps > 0
            && taps.is_multiple_of(16)
            && layer.filter.as_ptr().align_offset(4) == 0
            && outliers.is_some();
        plan.path = if lean {
            plan.outliers = outliers.unwrap_or(Outliers::NONE);
            let wide = p.kernel_h * p.kernel_w > 1
                && input_dims.c.is_multiple_of(4)
                && scratch_len >= 4 * taps + wide_len(input_dims, p);
            let row_len = p.kernel_w * input_dims.c;
            let rows = row_len > 0 && row_len.is_multiple_of(4) && unclamped;
            if wide {
                ConvPath::Wide
            } else {
                ConvPath::Lean { rows }
            }
        } else if n == 4 {
            ConvPath::Tile1x4 { padded }
        } else {
            ConvPath::Tile2x2 { padded }
        };
        plan
    }
}

/// One call's tensors as raw pointers (lengths validated by the caller).
#[derive(Clone, Copy)]
struct ConvIo<'l, 'a> {
    layer: &'l Conv2d<'a>,
    input: *const i8,
    in_dims: Dims,
    output: *mut i8,
    out_dims: Dims,
    /// The aligned scratch: the block first (then, on the wide path, the
    /// widened input).
    col: *mut i16,
}

impl ConvIo<'_, '_> {
    /// Output pixels.
    fn pixels(&self) -> usize {
        self.out_dims.h * self.out_dims.w
    }

    /// Gathers the block of `k.n` pixels from output pixel `pix` (`valid`
    /// of them in the output) pixel by pixel, through `cols_buf` on the
    /// padded path; a short last block repeats its last pixel, whose
    /// outputs are dropped.
    ///
    /// # Safety
    /// The scratch holds a block of `k`; `pix < pixels()`, `valid >= 1`;
    /// with `cols_buf`, `k` is the padded path's geometry.
    #[inline(always)]
    unsafe fn gather_block(
        &self,
        k: Cols,
        pix: usize,
        valid: usize,
        mut cols_buf: Option<&mut [u32; PAD_MAX / 4]>,
    ) {
        let p = &self.layer.params;
        let (col, inp, dims) = (self.col, self.input, self.in_dims);
        for j in 0..k.n {
            let q = pix + j.min(valid - 1);
            let (oy, ox) = (q / self.out_dims.w, q % self.out_dims.w);
            // SAFETY: the block holds `n` columns; `q` is an output pixel.
            unsafe {
                match cols_buf.as_deref_mut() {
                    Some(b) => im2col_padded(col, k, j, inp, dims, p, oy, ox, b),
                    None => im2col(col, k, j, inp, dims, p, oy, ox),
                }
            };
        }
    }
}

/// The fast convolution. The caller has validated everything
/// [`conv2d_s8`](crate::kernels::conv2d_s8) validates: lengths of input,
/// output, filter, bias, requantization, a scratch of at least two columns,
/// and parameter ranges. Runs the path [`ConvPlan::new`] picks.
/// Returns `false` (and does nothing) when the scratch is not 4-byte aligned
/// and has no element to spare for aligning it, or the path is
/// [`ConvPath::Reference`]; the caller then runs the reference kernel.
pub(crate) fn conv2d_s8_dsp(
    layer: &Conv2d<'_>,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
    scratch: &mut [i16],
) -> bool {
    // Columns start 4-byte aligned, so column words are plain aligned loads.
    let skip = scratch.as_ptr().align_offset(4);
    if skip > 1 {
        return false;
    }
    let scratch = &mut scratch[skip..];
    let plan = ConvPlan::new(layer, input_dims, output_dims.c, scratch.len());
    let taps = layer.params.kernel_h * layer.params.kernel_w * input_dims.c;
    let out_c = output_dims.c;
    debug_assert!(input.len() == input_dims.len());
    debug_assert!(output.len() == output_dims.h * output_dims.w * out_c);
    debug_assert!(layer.filter.len() == out_c * taps);
    debug_assert!(layer.bias.len() == out_c && layer.requant.shift.len() == out_c);
    let io = ConvIo {
        layer,
        input: input.as_ptr(),
        in_dims: input_dims,
        output: output.as_mut_ptr(),
        out_dims: output_dims,
        col: scratch.as_mut_ptr(),
    };
    // SAFETY: the lengths above (validated by the caller); the plan's
    // conditions for each path (scratch, alignment, shapes).
    unsafe {
        match plan.path {
            ConvPath::Reference => return false,
            ConvPath::Wide => wide::run(&io, &plan),
            ConvPath::Stem { blocks } => stem::run(&io, &plan, blocks),
            ConvPath::Lean { rows } => lean::run(&io, &plan, rows),
            ConvPath::Tile1x4 { padded } => tile1x4::run(&io, &plan, padded),
            ConvPath::Tile2x2 { padded } => tile2x2::run(&io, &plan, padded),
        }
    }
    true
}
