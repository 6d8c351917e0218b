//! From a model blob to the TFLite graph that TFLM runs bit for bit like
//! `shared::model::run`: tensors, ops and constant buffers as plain data
//! ([`Net`]), before any flatbuffer is written.
//!
//! TFLM recomputes every requantization parameter in `Prepare` from the
//! `float32` scales of the file: `QuantizeMultiplier(input_scale *
//! filter_scale[c] / output_scale)` in `double` for conv and FC, and ADD's
//! parameters from its three tensor scales. The blob stores the integers,
//! not the per-channel filter scales, so [`filter_scale`] finds, for each
//! channel, a `float32` filter scale from which TFLM derives exactly the
//! blob's multiplier and shift, and [`plan`] counts the channels (and adds)
//! for which none exists (a blob exported before `quantize::f32_exact`).

use anyhow::{bail, ensure, Result};
use shared::kernels::{AddParams, Conv2d, Dims, FullyConnected, PoolParams};
use shared::model::{LayerKind, Model, TensorInfo};
use shared::quant::quantize_multiplier;

use super::schema::tflite::{ActivationFunctionType as Act, BuiltinOperator, Padding, TensorType};

/// Quantization of a tensor: one scale and zero point, or one per channel
/// along `dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quant {
    /// Scales.
    pub scale: Vec<f32>,
    /// Zero points.
    pub zero_point: Vec<i64>,
    /// The quantized dimension (per-channel filters: 0).
    pub dim: i32,
}

/// A tensor of the TFLite graph.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Name shown in Netron.
    pub name: String,
    /// Shape (NHWC activations, OHWI conv filters, `[out, in]` FC weights).
    pub shape: Vec<i32>,
    /// Element type.
    pub ty: TensorType,
    /// Index into [`Net::buffers`] (0: no data, an activation).
    pub buffer: u32,
    /// Quantization, if any.
    pub quant: Option<Quant>,
}

/// Builtin options of an op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Options {
    /// `Conv2DOptions`.
    Conv {
        /// SAME or VALID.
        padding: Padding,
        /// `(h, w)`.
        stride: (i32, i32),
        /// Fused activation.
        act: Act,
    },
    /// `Pool2DOptions`.
    Pool {
        /// SAME or VALID.
        padding: Padding,
        /// `(h, w)`.
        stride: (i32, i32),
        /// `(h, w)`.
        filter: (i32, i32),
    },
    /// `AddOptions`.
    Add {
        /// Fused activation.
        act: Act,
    },
    /// `FullyConnectedOptions`.
    Fc {
        /// Fused activation.
        act: Act,
    },
    /// `PadOptions`.
    Pad,
    /// `PadV2Options`.
    PadV2,
}

/// An op of the TFLite graph.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSpec {
    /// The builtin op.
    pub code: BuiltinOperator,
    /// Input tensor indices.
    pub inputs: Vec<i32>,
    /// Output tensor indices.
    pub outputs: Vec<i32>,
    /// Options.
    pub options: Options,
}

/// The TFLite graph of a blob. Tensor `i < blob tensor count` is the
/// blob's tensor `i` (so intermediate tensors can be compared by index);
/// filters, biases, paddings and padded tensors follow.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Net {
    /// Tensors.
    pub tensors: Vec<TensorSpec>,
    /// Ops in execution order.
    pub ops: Vec<OpSpec>,
    /// Constant data; buffer 0 is the empty buffer activations point to.
    pub buffers: Vec<Vec<u8>>,
    /// The graph input.
    pub input: i32,
    /// The graph output.
    pub output: i32,
    /// Conv/FC channels whose multiplier and shift TFLM cannot derive from
    /// any `float32` filter scale (0 for a blob exported with this version).
    pub inexact_channels: usize,
    /// Conv/FC channels in all.
    pub channels: usize,
    /// ADD layers whose parameters TFLM derives differently from the blob.
    pub inexact_adds: usize,
}

/// TFLM's `Prepare` for one conv/FC channel: `QuantizeMultiplier` of
/// `input_scale * filter_scale / output_scale`, in `double`.
pub fn tflm_multiplier(s_in: f32, s_filter: f32, s_out: f32) -> (i32, i32) {
    quantize_multiplier(f64::from(s_in) * f64::from(s_filter) / f64::from(s_out))
}

/// ULPs searched on each side of the estimate in [`filter_scale`].
const SEARCH_ULPS: i32 = 64;

/// A `float32` filter scale from which TFLM derives exactly `(m, shift)`
/// between tensors of scales `s_in` and `s_out`: `Ok` with the one nearest
/// the real value `m * 2^(shift - 31) * s_out / s_in`, or `Err` with that
/// estimate when no `float32` near it gives exactly `(m, shift)`.
pub fn filter_scale(m: i32, shift: i32, s_in: f32, s_out: f32) -> Result<f32, f32> {
    let real = f64::from(m) * 2f64.powi(shift - 31);
    let guess = (real * f64::from(s_out) / f64::from(s_in)) as f32;
    if tflm_multiplier(s_in, guess, s_out) == (m, shift) {
        return Ok(guess);
    }
    for d in 1..=SEARCH_ULPS {
        for bits in [
            guess.to_bits().wrapping_add(d as u32),
            guess.to_bits().wrapping_sub(d as u32),
        ] {
            let c = f32::from_bits(bits);
            if c.is_finite() && c > 0.0 && tflm_multiplier(s_in, c, s_out) == (m, shift) {
                return Ok(c);
            }
        }
    }
    Err(guess)
}

/// `[1, h, w, c]`, or `[1, c]` for the network output (FC logits).
fn shape(d: Dims, flat: bool) -> Vec<i32> {
    if flat {
        vec![1, d.len() as i32]
    } else {
        vec![1, d.h as i32, d.w as i32, d.c as i32]
    }
}

fn per_tensor(t: &TensorInfo) -> Quant {
    Quant {
        scale: vec![t.scale],
        zero_point: vec![i64::from(t.zero_point)],
        dim: 0,
    }
}

/// The fused activation that makes TFLM clamp to `[act_min, act_max]` for
/// an output of zero point `zp`.
fn activation(act_min: i8, act_max: i8, zp: i32, what: &str) -> Result<Act> {
    ensure!(
        act_max == 127,
        "{what}: upper clamp {act_max}: only 127 (no ReLU6) has a TFLite activation here"
    );
    match i32::from(act_min) {
        -128 => Ok(Act::NONE),
        m if m == zp => Ok(Act::RELU),
        m => bail!("{what}: lower clamp {m} is neither -128 nor the output zero point {zp} (ReLU)"),
    }
}

impl Net {
    fn tensor(&mut self, t: TensorSpec) -> i32 {
        self.tensors.push(t);
        (self.tensors.len() - 1) as i32
    }

    fn buffer(&mut self, data: Vec<u8>) -> u32 {
        self.buffers.push(data);
        (self.buffers.len() - 1) as u32
    }

    /// A constant tensor holding `data`.
    fn constant(
        &mut self,
        name: String,
        shape: Vec<i32>,
        ty: TensorType,
        data: Vec<u8>,
        quant: Option<Quant>,
    ) -> i32 {
        let buffer = self.buffer(data);
        self.tensor(TensorSpec {
            name,
            shape,
            ty,
            buffer,
            quant,
        })
    }

    fn op(&mut self, code: BuiltinOperator, inputs: Vec<i32>, output: i32, options: Options) {
        self.ops.push(OpSpec {
            code,
            inputs,
            outputs: vec![output],
            options,
        });
    }

    /// An explicit PAD (`value` `None`: the input's zero point) or PADV2
    /// (`value`) of `pad` rows/columns on each side of tensor `input`, for
    /// a window op that then runs VALID. Returns the padded tensor.
    fn pad(&mut self, name: &str, input: i32, pad: (usize, usize), value: Option<i8>) -> i32 {
        let src = self.tensors[input as usize].clone();
        let (ph, pw) = (pad.0 as i32, pad.1 as i32);
        let paddings: Vec<u8> = [0, 0, ph, ph, pw, pw, 0, 0]
            .iter()
            .flat_map(|v: &i32| v.to_le_bytes())
            .collect();
        let paddings = self.constant(
            format!("{name}/paddings"),
            vec![4, 2],
            TensorType::INT32,
            paddings,
            None,
        );
        let mut padded_shape = src.shape.clone();
        padded_shape[1] += 2 * ph;
        padded_shape[2] += 2 * pw;
        let out = self.tensor(TensorSpec {
            name: format!("{name}/padded"),
            shape: padded_shape,
            buffer: 0,
            ..src.clone()
        });
        match value {
            None => self.op(
                BuiltinOperator::PAD,
                vec![input, paddings],
                out,
                Options::Pad,
            ),
            Some(v) => {
                let c = self.constant(
                    format!("{name}/pad_value"),
                    vec![],
                    TensorType::INT8,
                    vec![v as u8],
                    src.quant,
                );
                self.op(
                    BuiltinOperator::PADV2,
                    vec![input, paddings, c],
                    out,
                    Options::PadV2,
                );
            }
        }
        out
    }

    /// Per-channel `float32` filter scales for TFLM to derive exactly
    /// `requant`'s multipliers and shifts (see [`filter_scale`]); counts the
    /// channels where none exists.
    fn filter_scales(
        &mut self,
        multiplier: &[i32],
        shift: &[i32],
        s_in: f32,
        s_out: f32,
    ) -> Vec<f32> {
        self.channels += multiplier.len();
        multiplier
            .iter()
            .zip(shift)
            .map(|(&m, &s)| {
                filter_scale(m, s, s_in, s_out).unwrap_or_else(|nearest| {
                    self.inexact_channels += 1;
                    nearest
                })
            })
            .collect()
    }

    /// Filter (`shape`, per-channel scales `fs`) and int32 bias tensors of
    /// a conv or FC layer.
    fn weights(
        &mut self,
        name: &str,
        shape: Vec<i32>,
        filter: &[i8],
        bias: &[i32],
        fs: &[f32],
        s_in: f32,
    ) -> (i32, i32) {
        let n = fs.len();
        let wq = Quant {
            scale: fs.to_vec(),
            zero_point: vec![0; n],
            dim: 0,
        };
        let f = self.constant(
            format!("{name}/filter"),
            shape,
            TensorType::INT8,
            filter.iter().map(|&v| v as u8).collect(),
            Some(wq),
        );
        let bq = Quant {
            scale: fs.iter().map(|&s| s_in * s).collect(),
            zero_point: vec![0; n],
            dim: 0,
        };
        let bytes = bias.iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = self.constant(
            format!("{name}/bias"),
            vec![n as i32],
            TensorType::INT32,
            bytes,
            Some(bq),
        );
        (f, b)
    }
}

/// The TFLite graph of `model`. Fails on what TFLite cannot express the
/// same way (a clamp other than none or ReLU, a pool that requantizes, an
/// average pool with padding other than SAME's); multipliers TFLM cannot
/// derive are counted in [`Net::inexact_channels`] and
/// [`Net::inexact_adds`], not refused.
pub fn plan(model: &Model<'_>) -> Result<Net> {
    let mut net = Net {
        buffers: vec![Vec::new()],
        input: i32::from(model.input_index()),
        output: i32::from(model.output_index()),
        ..Net::default()
    };
    for i in 0..model.tensor_count() {
        let t = tensor_info(model, i)?;
        net.tensor(TensorSpec {
            name: format!("tensor{i}"),
            shape: shape(t.dims, i == model.output_index()),
            ty: TensorType::INT8,
            buffer: 0,
            quant: Some(per_tensor(&t)),
        });
    }
    net.tensors[net.input as usize].name = "input".into();
    for layer in model.layers() {
        net.tensors[usize::from(layer.output)].name = layer.name.to_string();
        let io = Io {
            name: layer.name,
            input: i32::from(layer.input),
            output: i32::from(layer.output),
            tin: tensor_info(model, layer.input)?,
            tout: tensor_info(model, layer.output)?,
        };
        match &layer.kind {
            LayerKind::Conv(c) => net.conv(&io, c)?,
            LayerKind::MaxPool(p) => net.pool(&io, p, BuiltinOperator::MAX_POOL_2D)?,
            LayerKind::AvgPool(p) => net.pool(&io, p, BuiltinOperator::AVERAGE_POOL_2D)?,
            LayerKind::Add(p) => {
                let t2 = tensor_info(model, layer.input2)?;
                net.add(&io, p, (i32::from(layer.input2), t2))?
            }
            LayerKind::FullyConnected(fc) => net.fc(&io, fc)?,
        }
    }
    Ok(net)
}

fn tensor_info(model: &Model<'_>, i: u16) -> Result<TensorInfo> {
    match model.tensor(i) {
        Some(t) => Ok(t),
        None => bail!("tensor {i} is not in the model"),
    }
}

/// A layer's name and its input and output tensors.
struct Io<'a> {
    name: &'a str,
    input: i32,
    output: i32,
    tin: TensorInfo,
    tout: TensorInfo,
}

/// How a window op of `kernel`, `stride` and symmetric `pad` runs in
/// TFLite: `Some(padding)` when VALID (no padding) or SAME (stride 1, odd
/// kernel, pad `(kernel - 1) / 2`: what TFLite computes) gives our output;
/// `None` when it needs an explicit PAD first. TFLite's SAME with stride 2
/// on an even size pads 0 before and 1 after, our layers 1 before.
fn window_padding(
    kernel: (usize, usize),
    stride: (usize, usize),
    pad: (usize, usize),
) -> Option<Padding> {
    let same_1d = |k: usize, s: usize, p: usize| s == 1 && k % 2 == 1 && p == (k - 1) / 2;
    if pad == (0, 0) {
        Some(Padding::VALID)
    } else if same_1d(kernel.0, stride.0, pad.0) && same_1d(kernel.1, stride.1, pad.1) {
        Some(Padding::SAME)
    } else {
        None
    }
}

impl Net {
    fn conv(&mut self, io: &Io<'_>, c: &Conv2d<'_>) -> Result<()> {
        let p = &c.params;
        let act = activation(p.act_min, p.act_max, io.tout.zero_point, io.name)?;
        let fs = self.filter_scales(
            c.requant.multiplier,
            c.requant.shift,
            io.tin.scale,
            io.tout.scale,
        );
        let filter_shape =
            [io.tout.dims.c, p.kernel_h, p.kernel_w, io.tin.dims.c].map(|v| v as i32);
        let (f, b) = self.weights(
            io.name,
            filter_shape.to_vec(),
            c.filter,
            c.bias,
            &fs,
            io.tin.scale,
        );
        let (input, padding) = match window_padding(
            (p.kernel_h, p.kernel_w),
            (p.stride_h, p.stride_w),
            (p.pad_h, p.pad_w),
        ) {
            Some(padding) => (io.input, padding),
            None => (
                self.pad(io.name, io.input, (p.pad_h, p.pad_w), None),
                Padding::VALID,
            ),
        };
        let stride = (p.stride_h as i32, p.stride_w as i32);
        self.op(
            BuiltinOperator::CONV_2D,
            vec![input, f, b],
            io.output,
            Options::Conv {
                padding,
                stride,
                act,
            },
        );
        Ok(())
    }

    fn pool(&mut self, io: &Io<'_>, p: &PoolParams, code: BuiltinOperator) -> Result<()> {
        ensure!(
            (io.tin.scale, io.tin.zero_point) == (io.tout.scale, io.tout.zero_point),
            "{}: a pool must keep its input's scale and zero point (TFLM's pools do not requantize)",
            io.name
        );
        ensure!(
            activation(p.act_min, p.act_max, io.tout.zero_point, io.name)? == Act::NONE,
            "{}: a pool with a clamp has no TFLite equivalent here",
            io.name
        );
        let window = (
            (p.kernel_h, p.kernel_w),
            (p.stride_h, p.stride_w),
            (p.pad_h, p.pad_w),
        );
        let (input, padding) = match (window_padding(window.0, window.1, window.2), code) {
            (Some(padding), _) => (io.input, padding),
            // Padding with -128 never wins a max, as our pool skips it.
            (None, BuiltinOperator::MAX_POOL_2D) => (self.pad(io.name, io.input, window.2, Some(i8::MIN)), Padding::VALID),
            (None, _) => bail!("{}: average pool padding {:?} with stride {:?}: TFLite's would count or place it differently", io.name, window.2, window.1),
        };
        let options = Options::Pool {
            padding,
            stride: (p.stride_h as i32, p.stride_w as i32),
            filter: (p.kernel_h as i32, p.kernel_w as i32),
        };
        self.op(code, vec![input], io.output, options);
        Ok(())
    }

    fn add(&mut self, io: &Io<'_>, p: &AddParams, (input2, t2): (i32, TensorInfo)) -> Result<()> {
        let act = activation(p.act_min, p.act_max, io.tout.zero_point, io.name)?;
        let q = |t: &TensorInfo| (f64::from(t.scale), t.zero_point);
        let tflm = AddParams::from_scales(q(&io.tin), q(&t2), q(&io.tout), act == Act::RELU);
        if tflm.to_array() != p.to_array() || (tflm.act_min, tflm.act_max) != (p.act_min, p.act_max)
        {
            self.inexact_adds += 1;
        }
        self.op(
            BuiltinOperator::ADD,
            vec![io.input, input2],
            io.output,
            Options::Add { act },
        );
        Ok(())
    }

    fn fc(&mut self, io: &Io<'_>, fc: &FullyConnected<'_>) -> Result<()> {
        let act = activation(fc.act_min, fc.act_max, io.tout.zero_point, io.name)?;
        let fs = self.filter_scales(
            fc.requant.multiplier,
            fc.requant.shift,
            io.tin.scale,
            io.tout.scale,
        );
        let shape = vec![io.tout.dims.len() as i32, io.tin.dims.len() as i32];
        let (f, b) = self.weights(io.name, shape, fc.filter, fc.bias, &fs, io.tin.scale);
        self.op(
            BuiltinOperator::FULLY_CONNECTED,
            vec![io.input, f, b],
            io.output,
            Options::Fc { act },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For float32 filter scales of every magnitude, the search finds one
    /// that gives back exactly the multiplier TFLM derives.
    #[test]
    fn filter_scale_inverts_tflm_derivation() {
        let (s_in, s_out) = (0.0234567f32, 0.0456789f32);
        let mut fs = 1.0e-4f32;
        while fs < 10.0 {
            let (m, shift) = tflm_multiplier(s_in, fs, s_out);
            let found = filter_scale(m, shift, s_in, s_out).unwrap();
            assert_eq!(tflm_multiplier(s_in, found, s_out), (m, shift), "fs {fs}");
            fs *= 1.0371;
        }
    }

    /// A multiplier from `f64` scales is usually not reachable: about one
    /// float32 step of the filter scale moves the multiplier by 2^7.
    #[test]
    fn unreachable_multiplier_is_reported() {
        let (s_in, s_out) = (0.0234567f32, 0.0456789f32);
        let (m, shift) = tflm_multiplier(s_in, 0.01, s_out);
        let unreachable = (1..64)
            .map(|d| m + d)
            .find(|&m2| filter_scale(m2, shift, s_in, s_out).is_err());
        assert!(unreachable.is_some());
    }

    #[test]
    fn window_padding_cases() {
        // TFLite SAME = symmetric padding only at stride 1 with an odd kernel.
        assert_eq!(window_padding((3, 3), (1, 1), (1, 1)), Some(Padding::SAME));
        assert_eq!(window_padding((1, 1), (2, 2), (0, 0)), Some(Padding::VALID));
        assert_eq!(window_padding((3, 3), (2, 2), (1, 1)), None);
        assert_eq!(window_padding((2, 2), (1, 1), (1, 1)), None);
        assert_eq!(window_padding((5, 5), (1, 1), (1, 1)), None);
    }

    #[test]
    fn activation_maps_clamps() {
        assert_eq!(activation(-128, 127, 5, "x").unwrap(), Act::NONE);
        assert_eq!(activation(-7, 127, -7, "x").unwrap(), Act::RELU);
        let err = activation(0, 127, -7, "layer9").unwrap_err().to_string();
        assert!(
            err.contains("layer9") && err.contains("lower clamp 0"),
            "{err}"
        );
        assert!(activation(-128, 100, 0, "x").is_err());
    }
}
