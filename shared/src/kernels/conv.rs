//! `conv2d_s8`: 2-D convolution, int8 in/out, per-channel requantization.

use super::{check_offsets, window_out, Dims, Requant};
use crate::error::{check_len, check_param, Error};
use crate::quant::requantize;

/// Number of im2col columns (output pixels) the conv kernel builds at once;
/// [`conv2d_s8_scratch_len`] reserves room for this many.
pub const IM2COL_COLUMNS: usize = 2;

/// Geometry, offsets and fused activation of a convolution.
///
/// Padding is symmetric (`pad_h` rows above and below, `pad_w` columns left
/// and right), as in PyTorch/candle, and padded taps are skipped, which is
/// the same as padding with the input zero point (TFLM's behaviour). The
/// output size is `(in + 2 * pad - kernel) / stride + 1` on each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Conv2dParams {
    /// Kernel rows, ≥ 1.
    pub kernel_h: usize,
    /// Kernel columns, ≥ 1.
    pub kernel_w: usize,
    /// Vertical stride, ≥ 1.
    pub stride_h: usize,
    /// Horizontal stride, ≥ 1.
    pub stride_w: usize,
    /// Rows of padding on each side, `< kernel_h`.
    pub pad_h: usize,
    /// Columns of padding on each side, `< kernel_w`.
    pub pad_w: usize,
    /// `-input_zero_point`, in `-127..=128`.
    pub input_offset: i32,
    /// `output_zero_point`, in `-128..=127`.
    pub output_offset: i32,
    /// Lower clamp of the output (the zero point for a fused ReLU).
    pub act_min: i8,
    /// Upper clamp of the output.
    pub act_max: i8,
}

impl Conv2dParams {
    /// The output dimensions for `input` and `out_c` filters, or `None` if the
    /// kernel does not fit the padded input or a stride/kernel is zero.
    pub const fn output_dims(&self, input: Dims, out_c: usize) -> Option<Dims> {
        match (
            window_out(input.h, self.kernel_h, self.stride_h, self.pad_h),
            window_out(input.w, self.kernel_w, self.stride_w, self.pad_w),
        ) {
            (Some(h), Some(w)) => Some(Dims::new(h, w, out_c)),
            _ => None,
        }
    }

    /// Multiply-accumulates per inference for this layer.
    pub const fn macs(&self, input: Dims, output: Dims) -> usize {
        output.len() * self.kernel_h * self.kernel_w * input.c
    }
}

/// A convolution layer: parameters plus its constant tensors.
#[derive(Debug, Clone, Copy)]
pub struct Conv2d<'a> {
    /// Geometry, offsets, activation.
    pub params: Conv2dParams,
    /// OHWI weights, `out_c * kernel_h * kernel_w * in_c` values, symmetric
    /// (zero point 0), normally in `-127..=127`.
    pub filter: &'a [i8],
    /// int32 bias per output channel, scale `input_scale * weight_scale[c]`.
    pub bias: &'a [i32],
    /// Per-output-channel requantization.
    pub requant: Requant<'a>,
}

/// Scratch `i16` elements [`conv2d_s8`] needs: [`IM2COL_COLUMNS`] im2col
/// columns of `kernel_h * kernel_w * input_channels` offset-applied inputs.
pub const fn conv2d_s8_scratch_len(params: &Conv2dParams, input_channels: usize) -> usize {
    IM2COL_COLUMNS * params.kernel_h * params.kernel_w * input_channels
}

/// Scratch `i16` elements (4-byte aligned) that let [`conv2d_s8`] take its
/// fastest path on `input` dims: a block of four im2col columns, plus, for
/// kernels larger than 1x1 on a multiple of 4 channels, the whole input
/// converted once to `i16` with its padding (the "widened input": each
/// block is then gathered by copying instead of converting, and border
/// pixels need no checks). Any scratch of at least
/// [`conv2d_s8_scratch_len`] gives the same bytes.
pub const fn conv2d_s8_fast_scratch_len(params: &Conv2dParams, input: Dims) -> usize {
    let taps = params.kernel_h * params.kernel_w * input.c;
    let wide = if params.kernel_h * params.kernel_w > 1 && input.c.is_multiple_of(4) {
        super::dsp::conv::wide_len(input, params)
    } else {
        0
    };
    4 * taps + wide
}

/// Everything [`conv2d_s8`] checks except the activation and scratch
/// buffers: parameter ranges, that `output_dims` follows from `input_dims`,
/// and the lengths of the filter, bias and requantization arrays.
pub fn conv2d_s8_validate(
    layer: &Conv2d<'_>,
    input_dims: Dims,
    output_dims: Dims,
) -> Result<(), Error> {
    let p = &layer.params;
    check_param("kernel", p.kernel_h > 0 && p.kernel_w > 0)?;
    check_param("stride", p.stride_h > 0 && p.stride_w > 0)?;
    check_param("padding", p.pad_h < p.kernel_h && p.pad_w < p.kernel_w)?;
    check_offsets(p.input_offset, p.output_offset, p.act_min, p.act_max)?;
    check_param("input_dims", !input_dims.is_empty())?;
    check_param("output_dims", output_dims.c > 0)?;
    let expected = p
        .output_dims(input_dims, output_dims.c)
        .ok_or(Error::Parameter { name: "kernel" })?;
    if expected != output_dims {
        return Err(Error::OutputDims {
            expected: expected.to_array(),
            actual: output_dims.to_array(),
        });
    }
    let taps = p.kernel_h * p.kernel_w * input_dims.c;
    check_len("filter", output_dims.c * taps, layer.filter.len())?;
    check_len("bias", output_dims.c, layer.bias.len())?;
    layer.requant.validate(output_dims.c)
}

/// 2-D convolution of an NHWC int8 tensor with OHWI int8 weights.
///
/// For each output pixel and channel `oc`:
/// `acc = bias[oc] + Σ (input + input_offset) * filter` over the taps inside
/// the input, then
/// `out = clamp(MBQM(acc, multiplier[oc], shift[oc]) + output_offset, act_min, act_max)`.
///
/// `input` holds `input_dims.len()` values; `output` holds
/// `output_dims.len()` values where `output_dims` must equal
/// [`Conv2dParams::output_dims`]; `scratch` holds at least
/// [`conv2d_s8_scratch_len`] values (its contents on return are unspecified).
/// The accumulator is int32 and wraps on overflow, which needs more than
/// 33,000 taps per output.
///
/// This is the fast kernel (`kernels::dsp`: SMLAD/SXTB16, real instructions
/// on Cortex-M4/M7, emulated elsewhere); it gives the same bytes as
/// [`conv2d_s8_reference`].
pub fn conv2d_s8(
    layer: &Conv2d<'_>,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
    scratch: &mut [i16],
) -> Result<(), Error> {
    check_buffers(layer, input, input_dims, output, output_dims, scratch)?;
    if !super::dsp::conv::conv2d_s8_dsp(layer, input, input_dims, output, output_dims, scratch) {
        // The scratch is not 4-byte aligned and has no element to spare.
        reference_unchecked(layer, input, input_dims, output, output_dims, scratch);
    }
    Ok(())
}

fn check_buffers(
    layer: &Conv2d<'_>,
    input: &[i8],
    input_dims: Dims,
    output: &[i8],
    output_dims: Dims,
    scratch: &[i16],
) -> Result<(), Error> {
    conv2d_s8_validate(layer, input_dims, output_dims)?;
    check_len("input", input_dims.len(), input.len())?;
    check_len("output", output_dims.len(), output.len())?;
    let need = conv2d_s8_scratch_len(&layer.params, input_dims.c);
    if scratch.len() < need {
        return Err(Error::BufferLength {
            buffer: "scratch",
            expected: need,
            actual: scratch.len(),
        });
    }
    Ok(())
}

/// The portable reference of [`conv2d_s8`] (same contract, same bytes):
/// plain loops over an `i16` im2col, the oracle of the fast kernel's tests.
pub fn conv2d_s8_reference(
    layer: &Conv2d<'_>,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
    scratch: &mut [i16],
) -> Result<(), Error> {
    check_buffers(layer, input, input_dims, output, output_dims, scratch)?;
    reference_unchecked(layer, input, input_dims, output, output_dims, scratch);
    Ok(())
}

fn reference_unchecked(
    layer: &Conv2d<'_>,
    input: &[i8],
    input_dims: Dims,
    output: &mut [i8],
    output_dims: Dims,
    scratch: &mut [i16],
) {
    let p = &layer.params;
    let taps = p.kernel_h * p.kernel_w * input_dims.c;
    let (col0, rest) = scratch.split_at_mut(taps);
    let col1 = &mut rest[..taps];

    let pixels = output_dims.h * output_dims.w;
    let out_c = output_dims.c;
    let mut pix = 0;
    while pix + 2 <= pixels {
        im2col(
            col0,
            input,
            input_dims,
            p,
            pix / output_dims.w,
            pix % output_dims.w,
        );
        let next = pix + 1;
        im2col(
            col1,
            input,
            input_dims,
            p,
            next / output_dims.w,
            next % output_dims.w,
        );
        let (out0, out1) = output[pix * out_c..(pix + 2) * out_c].split_at_mut(out_c);
        for (oc, (o0, o1)) in out0.iter_mut().zip(out1.iter_mut()).enumerate() {
            let f = &layer.filter[oc * taps..(oc + 1) * taps];
            let mut a0 = layer.bias[oc];
            let mut a1 = layer.bias[oc];
            for ((&w, &x0), &x1) in f.iter().zip(col0.iter()).zip(col1.iter()) {
                a0 = a0.wrapping_add(w as i32 * x0 as i32);
                a1 = a1.wrapping_add(w as i32 * x1 as i32);
            }
            let (m, s) = (layer.requant.multiplier[oc], layer.requant.shift[oc]);
            *o0 = requantize(a0, m, s, p.output_offset, p.act_min, p.act_max);
            *o1 = requantize(a1, m, s, p.output_offset, p.act_min, p.act_max);
        }
        pix += 2;
    }
    if pix < pixels {
        im2col(
            col0,
            input,
            input_dims,
            p,
            pix / output_dims.w,
            pix % output_dims.w,
        );
        let out = &mut output[pix * out_c..(pix + 1) * out_c];
        for (oc, o) in out.iter_mut().enumerate() {
            let f = &layer.filter[oc * taps..(oc + 1) * taps];
            let mut a = layer.bias[oc];
            for (&w, &x) in f.iter().zip(col0.iter()) {
                a = a.wrapping_add(w as i32 * x as i32);
            }
            let (m, s) = (layer.requant.multiplier[oc], layer.requant.shift[oc]);
            *o = requantize(a, m, s, p.output_offset, p.act_min, p.act_max);
        }
    }
}

/// Gathers the receptive field of output pixel `(oy, ox)` into `col` in HWI
/// order, with the input offset applied and padded taps set to 0.
#[inline]
fn im2col(col: &mut [i16], input: &[i8], dims: Dims, p: &Conv2dParams, oy: usize, ox: usize) {
    let c = dims.c;
    let row_len = p.kernel_w * c;
    for ky in 0..p.kernel_h {
        let dst = &mut col[ky * row_len..(ky + 1) * row_len];
        let iy = (oy * p.stride_h + ky).wrapping_sub(p.pad_h);
        if iy >= dims.h {
            dst.fill(0);
            continue;
        }
        for kx in 0..p.kernel_w {
            let d = &mut dst[kx * c..(kx + 1) * c];
            let ix = (ox * p.stride_w + kx).wrapping_sub(p.pad_w);
            if ix >= dims.w {
                d.fill(0);
            } else {
                let src = &input[(iy * dims.w + ix) * c..(iy * dims.w + ix + 1) * c];
                for (d, &s) in d.iter_mut().zip(src) {
                    *d = s as i16 + p.input_offset as i16;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
