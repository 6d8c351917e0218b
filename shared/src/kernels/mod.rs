//! int8 kernels, TFLite-Micro arithmetic, batch size 1.
//!
//! Conventions shared by every kernel:
//!
//! * **Layouts.** Activations are NHWC with N = 1, i.e. `[h][w][c]`,
//!   row-major, channels innermost. Conv filters are OHWI
//!   (`[out_c][kernel_h][kernel_w][in_c]`), fully-connected filters are
//!   `[out][in]`.
//! * **Quantization.** `real = scale * (q - zero_point)`. Kernels take the
//!   TFLM *offsets*: `input_offset = -input_zero_point` (so in `-127..=128`)
//!   and `output_offset = output_zero_point` (in `-128..=127`). Weights are
//!   symmetric (zero point 0). Biases are int32 with scale
//!   `input_scale * weight_scale[c]`.
//! * **Requantization** goes through
//!   [`multiply_by_quantized_multiplier`](crate::quant::multiply_by_quantized_multiplier)
//!   with one `(multiplier, shift)` pair per output channel ([`Requant`]).
//! * **Activation** (ReLU or none) is fused as an int8 clamp
//!   `[act_min, act_max]`.
//! * **Errors, not panics.** Each kernel checks buffer lengths and parameter
//!   ranges in O(1) (O(channels) for shifts) before it touches data, and
//!   returns [`Error`] if they are wrong. Once the checks pass
//!   every index is in bounds and no arithmetic overflows.
//! * **Scratch.** Kernels that need scratch memory take it as an argument and
//!   say how much through a `*_scratch_len` function. Nothing is allocated.
//!   [`conv2d_s8`] runs faster with more than the minimum (four im2col
//!   columns instead of two, and room for its input widened to `i16`:
//!   [`conv2d_s8_fast_scratch_len`], `model::SCRATCH_LEN_FAST`) and with a
//!   4-byte-aligned scratch, and gives the same bytes either way.
//! * **Backends.** [`conv2d_s8`], [`maxpool_s8`] and [`add_s8`] are the fast
//!   kernels of [`dsp`] (SMLAD / SXTB16 / SSUB8+SEL: real instructions on
//!   Cortex-M4/M7, the plain-Rust emulation in [`dsp::isa`] elsewhere);
//!   [`conv2d_s8_reference`], [`maxpool_s8_reference`] and
//!   [`add_s8_reference`] are the portable references they are tested
//!   against, byte for byte. `avgpool_s8` and `fc_s8` (0.1% of the
//!   instructions) have one portable version.

mod add;
mod conv;
pub mod dsp;
mod fc;
mod pool;

pub use add::{add_s8, add_s8_reference, AddParams};
pub use conv::{
    conv2d_s8, conv2d_s8_fast_scratch_len, conv2d_s8_reference, conv2d_s8_scratch_len,
    conv2d_s8_validate, Conv2d, Conv2dParams, IM2COL_COLUMNS,
};
pub use fc::{fc_s8, FullyConnected};
pub use pool::{avgpool_s8, maxpool_s8, maxpool_s8_reference, PoolParams};

use crate::error::{check_len, check_param, Error};
use crate::quant::{MAX_SHIFT, MIN_SHIFT};

/// Height, width and channels of an NHWC activation tensor (batch 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Dims {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Channels (innermost).
    pub c: usize,
}

impl Dims {
    /// `Dims { h, w, c }`.
    pub const fn new(h: usize, w: usize, c: usize) -> Self {
        Self { h, w, c }
    }

    /// Number of elements, `h * w * c`.
    pub const fn len(&self) -> usize {
        self.h * self.w * self.c
    }

    /// `true` if any dimension is zero.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[h, w, c]`, as reported in errors.
    pub const fn to_array(self) -> [usize; 3] {
        [self.h, self.w, self.c]
    }
}

/// Per-output-channel requantization: channel `c` is scaled by
/// `multiplier[c] * 2^(shift[c] - 31)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requant<'a> {
    /// Q31 multipliers, in `[2^30, 2^31)` or 0.
    pub multiplier: &'a [i32],
    /// Shifts, in `-31..=30`.
    pub shift: &'a [i32],
}

impl Requant<'_> {
    /// Checks that both slices have `channels` entries and every shift is in range.
    pub(crate) fn validate(&self, channels: usize) -> Result<(), Error> {
        check_len("multiplier", channels, self.multiplier.len())?;
        check_len("shift", channels, self.shift.len())?;
        check_param(
            "shift",
            self.shift
                .iter()
                .all(|s| (MIN_SHIFT..=MAX_SHIFT).contains(s)),
        )
    }
}

/// Output size of a window op along one axis with symmetric padding `pad`:
/// `(input + 2 * pad - kernel) / stride + 1`, or `None` if the window never fits.
pub(crate) const fn window_out(
    input: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
) -> Option<usize> {
    let padded = input + 2 * pad;
    if stride == 0 || kernel == 0 || padded < kernel {
        None
    } else {
        Some((padded - kernel) / stride + 1)
    }
}

/// Validates the offsets and clamp common to conv, FC and add.
pub(crate) fn check_offsets(
    input_offset: i32,
    output_offset: i32,
    act_min: i8,
    act_max: i8,
) -> Result<(), Error> {
    check_param("input_offset", (-127..=128).contains(&input_offset))?;
    check_param("output_offset", (-128..=127).contains(&output_offset))?;
    check_param("act_min", act_min <= act_max)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Independent plain references for the kernel tests. They share no code
    //! with the kernels: rounding is written from its mathematical
    //! definition in i128.

    /// `x * m * 2^(shift - 31)` with TFLM's two roundings, written as
    /// floor divisions in i128.
    pub fn ref_requant(x: i64, m: i32, shift: i32) -> i64 {
        let x = x as i32 as i128; // accumulators are int32 in TFLM too
        let xs = if shift > 0 { x << shift } else { x };
        let xs = xs as i32 as i128; // the C code works in int32
                                    // Round 1: nearest, ties up: floor((2*xs*m + 2^31) / 2^32).
        let p = (2 * xs * m as i128 + (1i128 << 31)).div_euclid(1i128 << 32);
        let p = p.clamp(i32::MIN as i128, i32::MAX as i128);
        // Round 2: nearest, ties away from zero.
        let e = if shift > 0 { 0 } else { -shift };
        let mag = p.abs();
        let q = if e == 0 {
            mag
        } else {
            (mag + (1i128 << (e - 1))) >> e
        };
        (if p < 0 { -q } else { q }) as i64
    }

    /// Clamp to `[lo, hi]` and narrow.
    pub fn ref_clamp(x: i64, lo: i8, hi: i8) -> i8 {
        x.clamp(lo as i64, hi as i64) as i8
    }

    /// SplitMix64: deterministic test data from a proptest seed.
    pub use crate::rng::Rng;
}
