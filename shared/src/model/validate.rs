//! Validation of a parsed blob: everything [`Model::run`] relies on, so
//! that `run` cannot fail and the kernels see only parameters in their
//! documented ranges. Called once by [`Model::parse`] after the header and
//! table bounds are checked; it allocates nothing.
//!
//! Lengths are computed in `u64` before any `usize` product, so a blob
//! cannot overflow the 32-bit target's arithmetic.

use super::format::LayerRecord;
use super::{overlaps, span, Layer, LayerKind, Model, ModelError, TensorInfo};
use crate::error::Error;
use crate::kernels::{
    conv2d_s8_scratch_len, conv2d_s8_validate, AddParams, Conv2d, Dims, FullyConnected, PoolParams,
    IM2COL_COLUMNS,
};
use crate::preprocess::{INPUT_CHANNELS, INPUT_SIZE};

/// Whether `m` is a valid requantization multiplier: `[2^30, 2^31)` or 0
/// (what `quant::quantize_multiplier` returns for a non-negative scale).
fn multiplier_ok(m: i32) -> bool {
    m == 0 || m >= 1 << 30
}

// `IM2COL_COLUMNS * taps` fits a `usize` for any `taps` of a slice length
// (at most `isize::MAX`): the validator relies on it.
const _: () = assert!(IM2COL_COLUMNS <= 2);

/// Where a read tensor's contents come from.
enum Source {
    /// Still what its producer (or the network input) wrote.
    Live,
    /// Nobody wrote it before the reader.
    Unwritten,
    /// This layer's output overwrote it in the arena after it was written.
    Overwritten(u16),
}

/// Layer `i` with its input and output tensors, for the checks of
/// its parameters.
struct LayerCheck {
    i: u16,
    in0: TensorInfo,
    out: TensorInfo,
}

impl LayerCheck {
    fn bad(&self, field: &'static str) -> ModelError {
        ModelError::Layer {
            index: self.i,
            field,
        }
    }

    fn kernel(&self, error: Error) -> ModelError {
        ModelError::Kernel {
            index: self.i,
            error,
        }
    }

    /// A conv's or FC's offsets agree with its tensors' zero points.
    fn offsets(&self, input: i32, output: i32) -> Result<(), ModelError> {
        if input != -self.in0.zero_point {
            Err(self.bad("input_offset"))
        } else if output != self.out.zero_point {
            Err(self.bad("output_offset"))
        } else {
            Ok(())
        }
    }

    /// Every per-channel multiplier is in range.
    fn multipliers(&self, m: &[i32]) -> Result<(), ModelError> {
        if m.iter().all(|&m| multiplier_ok(m)) {
            Ok(())
        } else {
            Err(self.bad("multiplier"))
        }
    }

    fn validate_pool(&self, p: &PoolParams) -> Result<(), ModelError> {
        let (in0, out) = (&self.in0, &self.out);
        p.validate_dims(in0.dims, out.dims)
            .map_err(|e| self.kernel(e))?;
        // Pools keep their input's quantization.
        if out.zero_point != in0.zero_point {
            return Err(self.bad("zero_point"));
        }
        if out.scale.to_bits() != in0.scale.to_bits() {
            return Err(self.bad("scale"));
        }
        Ok(())
    }

    /// A residual add reading `in1` besides `in0`.
    fn validate_add(&self, p: &AddParams, in1: TensorInfo) -> Result<(), ModelError> {
        let (in0, out) = (&self.in0, &self.out);
        p.validate().map_err(|e| self.kernel(e))?;
        if in1.dims != in0.dims || out.dims != in0.dims {
            return Err(self.bad("dims"));
        }
        if overlaps(&in1.range(), &out.range()) {
            return Err(self.bad("output"));
        }
        for (m, field) in [
            (p.input1_multiplier, "input1_multiplier"),
            (p.input2_multiplier, "input2_multiplier"),
            (p.output_multiplier, "output_multiplier"),
        ] {
            if !multiplier_ok(m) {
                return Err(self.bad(field));
            }
        }
        if p.input1_offset != -in0.zero_point {
            return Err(self.bad("input1_offset"));
        }
        if p.input2_offset != -in1.zero_point {
            return Err(self.bad("input2_offset"));
        }
        if p.output_offset != out.zero_point {
            return Err(self.bad("output_offset"));
        }
        Ok(())
    }

    fn validate_fc(&self, fc: &FullyConnected<'_>) -> Result<(), ModelError> {
        let (in_len, out_len) = (self.in0.dims.len(), self.out.dims.len());
        if in_len as u64 * out_len as u64 != fc.filter.len() as u64 {
            return Err(self.bad("filter"));
        }
        fc.validate(in_len).map_err(|e| self.kernel(e))?;
        if out_len != fc.bias.len() {
            return Err(self.bad("dims"));
        }
        self.multipliers(fc.requant.multiplier)?;
        self.offsets(fc.input_offset, fc.output_offset)
    }
}

impl Model<'_> {
    pub(super) fn validate(&self) -> Result<(), ModelError> {
        for t in 0..self.n_tensors {
            self.validate_tensor(t)?;
        }
        if self.tensor_at(self.input).dims != Dims::new(INPUT_SIZE, INPUT_SIZE, INPUT_CHANNELS) {
            return Err(ModelError::Header {
                field: "input_dims",
            });
        }
        let out = self.tensor_at(self.output).dims;
        if out.h != 1 || out.w != 1 {
            return Err(ModelError::Header {
                field: "output_dims",
            });
        }
        for i in 0..self.n_layers {
            let layer = self.decode_layer(i)?;
            self.validate_layer(i, &layer)?;
            self.validate_dataflow(i, &layer)?;
        }
        // The logits are read after the last layer.
        match self.source(self.n_layers, self.output) {
            Source::Live => Ok(()),
            Source::Unwritten => Err(ModelError::Header { field: "output" }),
            Source::Overwritten(by) => Err(ModelError::Overwritten {
                layer: None,
                field: "output",
                tensor: self.output,
                by,
            }),
        }
    }

    fn validate_tensor(&self, t: u16) -> Result<(), ModelError> {
        let bad = |field| ModelError::Tensor { index: t, field };
        let r = self.tensor_record(t);
        if r.reserved_a != 0 || r.reserved_b != 0 {
            return Err(bad("reserved"));
        }
        let info = self.tensor_at(t);
        let Dims { h, w, c } = info.dims;
        if h == 0 || w == 0 || c == 0 {
            return Err(bad("dims"));
        }
        // Each dimension is a u16, so this product cannot overflow a u64.
        let len = h as u64 * w as u64 * c as u64;
        if len > self.arena_len as u64 {
            return Err(bad("dims"));
        }
        span(info.offset, len as usize, self.arena_len).ok_or(bad("offset"))?;
        if !(info.scale.is_finite() && info.scale > 0.0) {
            return Err(bad("scale"));
        }
        if !(-128..=127).contains(&info.zero_point) {
            return Err(bad("zero_point"));
        }
        Ok(())
    }

    /// Parameters and shapes of layer `i` (its tensor indices are checked
    /// here; dataflow in [`validate_dataflow`](Self::validate_dataflow)).
    fn validate_layer(&self, i: u16, layer: &Layer<'_>) -> Result<(), ModelError> {
        let bad = |field| ModelError::Layer { index: i, field };
        let r = LayerRecord::decode(self.layer_bytes(i));
        if r.reserved_a != [0; 3] || r.reserved_b != 0 {
            return Err(bad("reserved"));
        }
        let in0 = self.tensor(layer.input).ok_or(bad("input"))?;
        let out = self.tensor(layer.output).ok_or(bad("output"))?;
        if layer.output == self.input || overlaps(&in0.range(), &out.range()) {
            return Err(bad("output"));
        }
        let c = LayerCheck { i, in0, out };
        match &layer.kind {
            LayerKind::Conv(conv) => self.validate_conv(&c, conv),
            LayerKind::MaxPool(p) | LayerKind::AvgPool(p) => c.validate_pool(p),
            LayerKind::Add(p) => {
                let in1 = self.tensor(layer.input2).ok_or(bad("input2"))?;
                c.validate_add(p, in1)
            }
            LayerKind::FullyConnected(fc) => c.validate_fc(fc),
        }
    }

    fn validate_conv(&self, c: &LayerCheck, conv: &Conv2d<'_>) -> Result<(), ModelError> {
        let (in0, out) = (c.in0.dims, c.out.dims);
        let p = &conv.params;
        let taps = p.kernel_h as u64 * p.kernel_w as u64 * in0.c as u64;
        if taps * out.c as u64 != conv.filter.len() as u64 {
            return Err(c.bad("filter"));
        }
        // The filter holds `taps` bytes per output channel, so `taps` fits a
        // slice length and the scratch formula cannot overflow (see the
        // assertion on `IM2COL_COLUMNS` above).
        if conv2d_s8_scratch_len(p, in0.c) > self.scratch_len {
            return Err(c.bad("scratch"));
        }
        // The fast kernel sizes its widened input from the padding: keep
        // that product within 32 bits.
        let wide = (in0.h as u64 + 2 * p.pad_h as u64)
            * (in0.w as u64 + 2 * p.pad_w as u64)
            * in0.c as u64;
        if wide > u32::MAX as u64 / 4 {
            return Err(c.bad("padding"));
        }
        conv2d_s8_validate(conv, in0, out).map_err(|e| c.kernel(e))?;
        c.multipliers(conv.requant.multiplier)?;
        c.offsets(p.input_offset, p.output_offset)
    }

    /// Layer `i` writes a tensor nobody else writes, and reads tensors that
    /// still hold what was written to them.
    fn validate_dataflow(&self, i: u16, layer: &Layer<'_>) -> Result<(), ModelError> {
        if (0..i).any(|j| self.output_of(j) == layer.output) {
            return Err(ModelError::Layer {
                index: i,
                field: "output",
            });
        }
        let reads = [(layer.input, "input"), (layer.input2, "input2")];
        let n = if matches!(layer.kind, LayerKind::Add(_)) {
            2
        } else {
            1
        };
        for &(tensor, field) in &reads[..n] {
            match self.source(i, tensor) {
                Source::Live => {}
                Source::Unwritten => {
                    return Err(ModelError::Unwritten {
                        layer: i,
                        field,
                        tensor,
                    })
                }
                Source::Overwritten(by) => {
                    return Err(ModelError::Overwritten {
                        layer: Some(i),
                        field,
                        tensor,
                        by,
                    })
                }
            }
        }
        Ok(())
    }

    /// Where tensor `t` read by layer `reader` (or, for `reader ==
    /// layer_count()`, after the network) comes from: scanning back from
    /// the reader to its producer, no layer in between may write over its
    /// bytes. Layers before `reader` are already validated.
    fn source(&self, reader: u16, t: u16) -> Source {
        let bytes = self.tensor_at(t).range();
        for j in (0..reader).rev() {
            let out = self.output_of(j);
            if out == t {
                return Source::Live;
            }
            if overlaps(&self.tensor_at(out).range(), &bytes) {
                return Source::Overwritten(j);
            }
        }
        if t == self.input {
            Source::Live
        } else {
            Source::Unwritten
        }
    }

    /// The output tensor index of layer `j` (a validated layer).
    fn output_of(&self, j: u16) -> u16 {
        LayerRecord::decode(self.layer_bytes(j)).output
    }
}

#[cfg(test)]
pub(super) mod tests;
