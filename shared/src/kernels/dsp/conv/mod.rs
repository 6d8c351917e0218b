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

impl ConvIo<'_, '_> {
    /// [`Self::gather_block`] as a call, for the lean and the two tile
    /// paths: one shared copy of the gather instead of one inlined into
    /// each. Measured (`cargo xtask bench-mcu`): 8.1 KB less flash, and the
    /// instructions per inference 5,440 fewer rather than more (the call
    /// costs less than the code-layout effects of the inlined copies).
    ///
    /// # Safety
    /// As [`Self::gather_block`].
    #[inline(never)]
    unsafe fn gather_block_outlined(
        &self,
        k: Cols,
        pix: usize,
        valid: usize,
        cols_buf: Option<&mut [u32; PAD_MAX / 4]>,
    ) {
        // SAFETY: the caller upholds `gather_block`'s contract.
        unsafe { self.gather_block(k, pix, valid, cols_buf) }
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

#[cfg(test)]
mod tests {
    extern crate std;
    use super::{ConvPath, ConvPlan};
    use crate::kernels::{Conv2d, Conv2dParams, Dims, Requant};
    use crate::model::{default_model, LayerKind, SCRATCH_LEN, SCRATCH_LEN_FAST};
    use std::{format, string::String, vec, vec::Vec};

    const WIDE: ConvPath = ConvPath::Wide;
    const STEM: ConvPath = ConvPath::Stem { blocks: true };
    const ROWS: ConvPath = ConvPath::Lean { rows: true };
    const T2X2: ConvPath = ConvPath::Tile2x2 { padded: false };

    /// The path each conv of the shipped Mini-ResNet takes with the
    /// firmware's scratch ([`SCRATCH_LEN_FAST`]) and with the minimum
    /// ([`SCRATCH_LEN`]): `(name, in_c, out_c, kernel, stride, fast, min)`.
    /// A fast path that stops firing changes a row here.
    fn expected(name: &str) -> (usize, usize, usize, usize, ConvPath, ConvPath) {
        let stage = |s: &str| -> usize { 16 << (s.as_bytes()[5] - b'1') };
        match name {
            "stem.conv" => (3, 16, 3, 1, STEM, STEM),
            // Stage 1: 16 -> 16, 3x3 s1.
            n if n.starts_with("layer1.") => (16, 16, 3, 1, WIDE, ROWS),
            // Stages 2-4: the first conv halves the size (3x3 s2), the
            // shortcut is 1x1 s2.
            n if n.ends_with(".0.conv1") => {
                let c = stage(n);
                (c / 2, c, 3, 2, WIDE, ROWS)
            }
            n if n.ends_with(".0.short") => (stage(n) / 2, stage(n), 1, 2, ROWS, ROWS),
            // 3x3 s1 at the stage's width (the minimum scratch holds no
            // widened input; at 128 channels, 1152 taps, only two columns).
            n => {
                let c = stage(n);
                (c, c, 3, 1, WIDE, if c == 128 { T2X2 } else { ROWS })
            }
        }
    }

    #[test]
    fn mini_resnet_conv_paths() {
        let m = default_model().unwrap();
        assert_eq!(m.fast_scratch_len(), SCRATCH_LEN_FAST);
        let mut rows: Vec<String> = vec![];
        let mut n = 0;
        for layer in m.layers() {
            let LayerKind::Conv(conv) = layer.kind else {
                continue;
            };
            let (ind, outd) = (
                m.tensor(layer.input).unwrap().dims,
                m.tensor(layer.output).unwrap().dims,
            );
            let p = &conv.params;
            let (in_c, out_c, kernel, stride, fast, min) = expected(layer.name);
            let shape = (
                ind.c, outd.c, p.kernel_h, p.kernel_w, p.stride_h, p.stride_w,
            );
            assert_eq!(
                shape,
                (in_c, out_c, kernel, kernel, stride, stride),
                "{}",
                layer.name
            );
            let got_fast = ConvPlan::new(&conv, ind, outd.c, SCRATCH_LEN_FAST).path;
            let got_min = ConvPlan::new(&conv, ind, outd.c, SCRATCH_LEN).path;
            rows.push(format!(
                "{:16} {in_c:3}->{out_c:3} {kernel}x{kernel} s{stride} {:2}x{:<2} fast {got_fast:?} min {got_min:?}",
                layer.name, ind.h, ind.w
            ));
            assert_eq!((got_fast, got_min), (fast, min), "{}", layer.name);
            n += 1;
        }
        std::println!("{}", rows.join("\n"));
        // The stem, 2 * (3 + 4 + 6 + 3) stage convs, 3 shortcuts.
        assert_eq!(n, 36);
    }

    /// A layer of `in_c` -> `out_c` channels, `kernel` square, `stride`,
    /// padding `kernel / 2`, every channel in the folded domain.
    fn plan(in_c: usize, out_c: usize, kernel: usize, stride: usize, scratch: usize) -> ConvPath {
        plan_with(in_c, out_c, kernel, stride, scratch, i8::MIN, (1 << 30) + 1)
    }

    fn plan_with(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        scratch: usize,
        act_min: i8,
        multiplier: i32,
    ) -> ConvPath {
        let params = Conv2dParams {
            kernel_h: kernel,
            kernel_w: kernel,
            stride_h: stride,
            stride_w: stride,
            pad_h: kernel / 2,
            pad_w: kernel / 2,
            input_offset: 3,
            output_offset: -5,
            act_min,
            act_max: i8::MAX,
        };
        let taps = kernel * kernel * in_c;
        // 4-byte aligned filter rows.
        let filter_words = vec![0u32; out_c * taps / 4 + 1];
        let filter: &[i8] = &bytemuck::cast_slice(&filter_words)[..out_c * taps];
        let bias = vec![0i32; out_c];
        let (mult, shift) = (vec![multiplier; out_c], vec![-8i32; out_c]);
        let layer = Conv2d {
            params,
            filter,
            bias: &bias,
            requant: Requant {
                multiplier: &mult,
                shift: &shift,
            },
        };
        ConvPlan::new(&layer, Dims::new(32, 32, in_c), out_c, scratch).path
    }

    /// The Mini-ResNet shapes and the other paths, independent of the
    /// shipped blob's requantization.
    #[test]
    fn paths_by_shape() {
        let big = 1 << 20;
        assert_eq!(plan(3, 16, 3, 1, big), STEM);
        assert_eq!(plan(3, 16, 3, 2, big), ConvPath::Stem { blocks: false });
        for (in_c, out_c, stride) in [
            (16, 16, 1),
            (16, 32, 2),
            (32, 64, 2),
            (64, 128, 2),
            (128, 128, 1),
        ] {
            assert_eq!(
                plan(in_c, out_c, 3, stride, big),
                WIDE,
                "{in_c}->{out_c} s{stride}"
            );
            // Scratch for the block only.
            assert_eq!(plan(in_c, out_c, 3, stride, 4 * 9 * in_c), ROWS);
            // Clamped: no unclamped rows loop.
            let lean = ConvPath::Lean { rows: false };
            assert_eq!(
                plan_with(in_c, out_c, 3, stride, 4 * 9 * in_c, 0, (1 << 30) + 1),
                lean
            );
            assert_eq!(plan(in_c, out_c, 3, stride, 2 * 9 * in_c), T2X2);
        }
        for (in_c, out_c) in [(16, 32), (32, 64), (64, 128)] {
            assert_eq!(plan(in_c, out_c, 1, 2, big), ROWS, "1x1 {in_c}->{out_c}");
        }
        // Outside the folded domain: every channel (more outliers than
        // the lean loop takes) or `i32::MIN` (not run here at all).
        let t1x4 = ConvPath::Tile1x4 { padded: false };
        assert_eq!(plan_with(16, 16, 3, 1, big, i8::MIN, 1 << 30), t1x4);
        assert_eq!(
            plan_with(16, 16, 3, 1, big, i8::MIN, i32::MIN),
            ConvPath::Reference
        );
        assert_eq!(plan(16, 16, 3, 1, 2 * 9 * 16 - 1), ConvPath::Reference);
        // Taps not a multiple of 4, too many channels for the stem's copy.
        assert_eq!(plan(3, 64, 3, 1, big), ConvPath::Tile1x4 { padded: true });
        assert_eq!(
            plan(3, 64, 3, 1, 2 * 28),
            ConvPath::Tile2x2 { padded: true }
        );
        // More than 128 output channels: no lean table.
        assert_eq!(
            plan(16, 256, 3, 1, big),
            ConvPath::Tile1x4 { padded: false }
        );
    }
}
