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
pub(super) mod tests {
    //! `parse` on small hand-built blobs: a valid residual network, and
    //! each defect a CRC-valid blob can carry, one at a time.

    use super::super::format::{self, Header, LayerRecord, TensorRecord};
    use super::super::*;
    use crate::kernels::testutil::{ref_clamp, ref_requant};
    use crate::kernels::{AddParams, IM2COL_COLUMNS};

    struct T {
        dims: [u16; 3],
        offset: u32,
        scale: f32,
        zp: i32,
    }

    struct L {
        op: Op,
        geom: [u8; 6],
        act: (i8, i8),
        io: (u16, u16, u16),
        offsets: (i32, i32),
        /// Data offsets: filter, filter length, bias, multipliers, shifts.
        data: [u32; 5],
    }

    /// A blob under construction: `bytes` lays it out and computes its CRC,
    /// so every defect below comes with a valid checksum.
    pub(in crate::model) struct Blob {
        arena: u32,
        scratch: u32,
        input: u16,
        output: u16,
        tensors: Vec<T>,
        layers: Vec<L>,
        data: Vec<u8>,
    }

    impl Blob {
        fn push_i8(&mut self, v: &[i8]) -> u32 {
            while !self.data.len().is_multiple_of(4) {
                self.data.push(0);
            }
            let at = self.data.len() as u32;
            self.data.extend(v.iter().map(|&x| x as u8));
            at
        }

        fn push_i32(&mut self, v: &[i32]) -> u32 {
            let bytes: Vec<i8> = v
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .map(|b| b as i8)
                .collect();
            self.push_i8(&bytes)
        }

        fn set_i32(&mut self, at: u32, k: usize, v: i32) {
            let at = at as usize + 4 * k;
            self.data[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }

        fn get_i32(&self, at: u32, k: usize) -> i32 {
            let at = at as usize + 4 * k;
            i32::from_le_bytes(self.data[at..at + 4].try_into().unwrap())
        }

        pub(in crate::model) fn bytes(&self) -> Vec<u8> {
            let meta = b"model=hand-built\n";
            // One class per logit (of a valid output tensor).
            let classes = self
                .tensors
                .get(self.output as usize)
                .map_or(0, |t| t.dims.iter().map(|&d| d as usize).product::<usize>())
                .clamp(format::MIN_CLASSES, format::MAX_CLASSES);
            let h = Header {
                arena_len: self.arena,
                scratch_len: self.scratch,
                input: self.input,
                output: self.output,
                ..Header::layout(
                    meta.len(),
                    classes as u16,
                    self.tensors.len() as u16,
                    self.layers.len() as u16,
                    self.data.len(),
                )
                .unwrap()
            };
            let mut b = h.encode().to_vec();
            b.extend_from_slice(meta);
            b.resize(h.classes_at as usize, 0);
            for c in 0..classes {
                b.extend_from_slice(&format::class_name_field(&std::format!("class {c}")).unwrap());
            }
            for t in &self.tensors {
                b.extend_from_slice(&TensorRecord::new(t.dims, t.offset, t.scale, t.zp).encode());
            }
            for l in &self.layers {
                let [filter, filter_len, bias, multiplier, shift] = l.data;
                let r = LayerRecord {
                    kernel_h: l.geom[0],
                    kernel_w: l.geom[1],
                    stride_h: l.geom[2],
                    stride_w: l.geom[3],
                    pad_h: l.geom[4],
                    pad_w: l.geom[5],
                    act_min: l.act.0,
                    act_max: l.act.1,
                    input: l.io.0,
                    input2: l.io.1,
                    output: l.io.2,
                    input_offset: l.offsets.0,
                    output_offset: l.offsets.1,
                    filter,
                    filter_len,
                    bias,
                    multiplier,
                    shift,
                    name: format::name_field("test").unwrap(),
                    ..LayerRecord::new(l.op)
                };
                b.extend_from_slice(&r.encode());
            }
            b.extend_from_slice(&self.data);
            assert_eq!(b.len(), h.total_len as usize);
            format::seal(&mut b);
            b
        }
    }

    /// A deterministic byte pattern.
    pub(in crate::model) fn pattern(n: usize, seed: u32) -> Vec<i8> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) >> 13) as i8)
            .collect()
    }

    const ADD_SCALES: [(f64, i32); 3] = [(0.05, -10), (0.04, 0), (0.08, -20)];

    /// A residual network on the 32x32x3 input:
    /// `t1 = conv(t0); t2 = conv(t1); t3 = conv(t2); t4 = t1 + t3;
    /// t5 = avgpool(t4); t6 = fc(t5)` (1x1 convs, 4 channels, 10 logits),
    /// with an arena plan that reuses memory: t3 over the dead input, t4
    /// over the dead t2.
    pub(in crate::model) fn residual() -> Blob {
        let t = |dims, offset, (scale, zp): (f64, i32)| T {
            dims,
            offset,
            scale: scale as f32,
            zp,
        };
        let mut b = Blob {
            arena: 12288,
            scratch: (IM2COL_COLUMNS * 4) as u32,
            input: 0,
            output: 6,
            tensors: vec![
                t([32, 32, 3], 0, (1.0 / 128.0, 0)),
                t([32, 32, 4], 4096, ADD_SCALES[0]),
                t([32, 32, 4], 8192, (0.05, 5)),
                t([32, 32, 4], 0, ADD_SCALES[1]),
                t([32, 32, 4], 8192, ADD_SCALES[2]),
                t([1, 1, 4], 0, ADD_SCALES[2]),
                t([1, 1, 10], 16, (0.1, 3)),
            ],
            layers: Vec::new(),
            data: Vec::new(),
        };
        let channelwise = |b: &mut Blob, n_in: usize, n_out: usize, seed: u32| {
            let filter = b.push_i8(&pattern(n_in * n_out, seed));
            let bias: Vec<i32> = (0..n_out as i32).map(|o| 37 * o - 50).collect();
            let mult: Vec<i32> = (0..n_out as i32)
                .map(|o| (1 << 30) + 7_777_777 * o)
                .collect();
            let shift: Vec<i32> = (0..n_out as i32).map(|o| -6 - o % 3).collect();
            let bias = b.push_i32(&bias);
            let mult = b.push_i32(&mult);
            let shift = b.push_i32(&shift);
            [filter, (n_in * n_out) as u32, bias, mult, shift]
        };
        let zp = |b: &Blob, t: u16| b.tensors[t as usize].zp;
        let conv = |b: &mut Blob, i: u16, o: u16, relu: bool, data| L {
            op: Op::Conv,
            geom: [1, 1, 1, 1, 0, 0],
            act: (if relu { zp(b, o) as i8 } else { -128 }, 127),
            io: (i, NO_TENSOR, o),
            offsets: (-zp(b, i), zp(b, o)),
            data,
        };
        let d = channelwise(&mut b, 3, 4, 1);
        let l = conv(&mut b, 0, 1, true, d);
        b.layers.push(l);
        let d = channelwise(&mut b, 4, 4, 2);
        let l = conv(&mut b, 1, 2, false, d);
        b.layers.push(l);
        let d = channelwise(&mut b, 4, 4, 3);
        let l = conv(&mut b, 2, 3, true, d);
        b.layers.push(l);
        let p = AddParams::from_scales(ADD_SCALES[0], ADD_SCALES[1], ADD_SCALES[2], false);
        let at = b.push_i32(&p.to_array());
        b.layers.push(L {
            op: Op::Add,
            geom: [0; 6],
            act: (p.act_min, p.act_max),
            io: (1, 3, 4),
            offsets: (0, 0),
            data: [0, 0, at, 0, 0],
        });
        b.layers.push(L {
            op: Op::AvgPool,
            geom: [32, 32, 1, 1, 0, 0],
            act: (-128, 127),
            io: (4, NO_TENSOR, 5),
            offsets: (0, 0),
            data: [0; 5],
        });
        let d = channelwise(&mut b, 4, 10, 4);
        b.layers.push(L {
            op: Op::FullyConnected,
            geom: [0; 6],
            act: (-128, 127),
            io: (5, NO_TENSOR, 6),
            offsets: (-zp(&b, 5), zp(&b, 6)),
            data: d,
        });
        b
    }

    /// Parses `bytes` from 4-byte aligned memory and hands the result to `f`.
    fn with_model<R>(bytes: &[u8], f: impl FnOnce(Result<Model<'_>, ModelError>) -> R) -> R {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        f(Model::parse(&bytemuck::cast_slice(&words)[..bytes.len()]))
    }

    fn parse_err(b: &Blob) -> Option<ModelError> {
        with_model(&b.bytes(), |r| r.err())
    }

    /// A 1x1 conv or FC layer's output from its record, in plain i64 with
    /// the independent requantization reference.
    fn ref_channelwise(b: &Blob, l: &L, input: &[i8], pixels: usize) -> Vec<i8> {
        let n_out = b.tensors[l.io.2 as usize].dims[2] as usize;
        let n_in = input.len() / pixels;
        let mut out = Vec::new();
        for p in 0..pixels {
            for o in 0..n_out {
                let mut acc = b.get_i32(l.data[2], o) as i64;
                for k in 0..n_in {
                    let w = b.data[l.data[0] as usize + o * n_in + k] as i8;
                    acc += (input[p * n_in + k] as i64 + l.offsets.0 as i64) * w as i64;
                }
                let (m, s) = (b.get_i32(l.data[3], o), b.get_i32(l.data[4], o));
                let y = ref_requant(acc, m, s) + l.offsets.1 as i64;
                out.push(ref_clamp(y, l.act.0, l.act.1));
            }
        }
        out
    }

    /// TFLM's int8 ADD of one element, from its definition.
    fn ref_add(p: &AddParams, x1: i8, x2: i8) -> i8 {
        let side = |x: i8, off: i32, m: i32, s: i32| {
            ref_requant(
                ((x as i64 + off as i64) << p.left_shift) as i32 as i64,
                m,
                s,
            )
        };
        let sum = side(x1, p.input1_offset, p.input1_multiplier, p.input1_shift)
            + side(x2, p.input2_offset, p.input2_multiplier, p.input2_shift);
        let y = ref_requant(sum, p.output_multiplier, p.output_shift) + p.output_offset as i64;
        ref_clamp(y, p.act_min, p.act_max)
    }

    #[test]
    fn hand_built_residual_network_parses_and_runs_as_its_reference() {
        let b = residual();
        let bytes = b.bytes();
        with_model(&bytes, |m| {
            let m = m.unwrap();
            assert_eq!((m.layer_count(), m.tensor_count()), (6, 7));
            assert_eq!(m.layers().count(), 6);
            assert_eq!(m.meta_value("model"), Some("hand-built"));
            assert!(m.layer(5).is_some() && m.layer(6).is_none());
            assert_eq!(m.tensor(6).unwrap().dims, Dims::new(1, 1, 10));
            assert!(m.tensor(7).is_none());
            let input = pattern(INPUT_LEN, 9);
            let (mut arena, mut scratch) = (vec![0i8; 12288], vec![0i16; m.scratch_len()]);
            let mut logits = [0i8; 10];
            m.run(&input, &mut arena, &mut scratch, &mut logits)
                .unwrap();
            assert_eq!(
                m.run_layer(6, &mut arena, &mut scratch),
                Err(ModelError::Layer {
                    index: 6,
                    field: "index"
                })
            );

            // The same network, each tensor in its own buffer.
            let px = 32 * 32;
            let t1 = ref_channelwise(&b, &b.layers[0], &input, px);
            let t2 = ref_channelwise(&b, &b.layers[1], &t1, px);
            let t3 = ref_channelwise(&b, &b.layers[2], &t2, px);
            let LayerKind::Add(p) = m.layer(3).unwrap().kind else {
                panic!("layer 3 is the add")
            };
            let t4: Vec<i8> = t1
                .iter()
                .zip(&t3)
                .map(|(&x, &y)| ref_add(&p, x, y))
                .collect();
            // Average with rounding half away from zero (TFLM's AVERAGE_POOL).
            let t5: Vec<i8> = (0..4)
                .map(|c| {
                    let s: i64 = (0..px).map(|i| t4[i * 4 + c] as i64).sum();
                    let n = px as i64;
                    let q = if s >= 0 {
                        (s + n / 2) / n
                    } else {
                        (s - n / 2) / n
                    };
                    q as i8
                })
                .collect();
            let want = ref_channelwise(&b, &b.layers[5], &t5, 1);
            assert_eq!(logits.as_slice(), want.as_slice());
            assert!(
                want.iter().any(|&v| v != want[0]),
                "degenerate logits {want:?}"
            );
        });
    }

    #[test]
    fn residual_shortcut_overwritten_by_the_arena_plan() {
        let mut b = residual();
        // t3 (conv output) placed over t1, which the add still reads.
        b.tensors[3].offset = 4096;
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Overwritten {
                layer: Some(3),
                field: "input",
                tensor: 1,
                by: 2
            })
        );
    }

    #[test]
    fn reading_a_tensor_no_earlier_layer_wrote() {
        let mut b = residual();
        b.layers[1].io.0 = 3; // written by layer 2, after
        b.layers[1].offsets.0 = 0;
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Unwritten {
                layer: 1,
                field: "input",
                tensor: 3
            })
        );
        let mut b = residual();
        b.arena = 16384;
        b.tensors.push(T {
            dims: [32, 32, 4],
            offset: 12288, // bytes no layer writes
            scale: 0.04,
            zp: 0,
        });
        b.layers[3].io.1 = 7; // never written
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Unwritten {
                layer: 3,
                field: "input2",
                tensor: 7
            })
        );
    }

    #[test]
    fn a_tensor_written_twice() {
        let mut b = residual();
        b.layers[3].io.2 = 2; // the add writes layer 1's output again
        b.tensors[2].zp = -20;
        b.tensors[2].scale = 0.08;
        b.layers[1].offsets.1 = -20;
        b.layers[2].offsets.0 = 20;
        let err = parse_err(&b);
        assert_eq!(
            err,
            Some(ModelError::Layer {
                index: 3,
                field: "output"
            })
        );
    }

    #[test]
    fn requantization_multipliers_outside_their_range() {
        let layer = |i: u16, field| Some(ModelError::Layer { index: i, field });
        for bad in [-5, -(1 << 30), 1, (1 << 30) - 1, i32::MIN] {
            let mut b = residual();
            let at = b.layers[0].data[3];
            b.set_i32(at, 2, bad);
            assert_eq!(
                parse_err(&b),
                layer(0, "multiplier"),
                "conv multiplier {bad}"
            );
            let mut b = residual();
            let at = b.layers[5].data[3];
            b.set_i32(at, 9, bad);
            assert_eq!(parse_err(&b), layer(5, "multiplier"), "fc multiplier {bad}");
            for (k, field) in [
                (1, "input1_multiplier"),
                (4, "input2_multiplier"),
                (7, "output_multiplier"),
            ] {
                let mut b = residual();
                let at = b.layers[3].data[2];
                b.set_i32(at, k, bad);
                assert_eq!(parse_err(&b), layer(3, field), "add {field} {bad}");
            }
        }
        // The range's ends and 0 are valid.
        for good in [0, 1 << 30, i32::MAX] {
            let mut b = residual();
            let at = b.layers[0].data[3];
            b.set_i32(at, 2, good);
            assert_eq!(parse_err(&b), None, "multiplier {good}");
        }
    }

    #[test]
    fn scales_that_are_not_positive_and_finite() {
        for t in [3usize, 6] {
            for bad in [f32::NAN, -1.0, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY] {
                let mut b = residual();
                b.tensors[t].scale = bad;
                assert_eq!(
                    parse_err(&b),
                    Some(ModelError::Tensor {
                        index: t as u16,
                        field: "scale"
                    }),
                    "tensor {t} scale {bad}"
                );
            }
        }
        // A pool must keep its input's quantization.
        let mut b = residual();
        b.tensors[5].scale = 0.07;
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Layer {
                index: 4,
                field: "scale"
            })
        );
    }

    #[test]
    fn absurd_arena_and_scratch_lengths() {
        let header = |field| Some(ModelError::Header { field });
        for (arena, want) in [
            (u32::MAX, header("arena_len")),
            (MAX_ARENA_LEN as u32 + 1, header("arena_len")),
            (MAX_ARENA_LEN as u32, None),
            (
                12287,
                Some(ModelError::Tensor {
                    index: 2,
                    field: "offset",
                }),
            ),
        ] {
            let mut b = residual();
            b.arena = arena;
            assert_eq!(parse_err(&b), want, "arena {arena}");
        }
        for (scratch, want) in [
            (u32::MAX, header("scratch_len")),
            (MAX_SCRATCH_LEN as u32 + 1, header("scratch_len")),
            (MAX_SCRATCH_LEN as u32, None),
            (
                7,
                Some(ModelError::Layer {
                    index: 1,
                    field: "scratch",
                }),
            ),
        ] {
            let mut b = residual();
            b.scratch = scratch;
            assert_eq!(parse_err(&b), want, "scratch {scratch}");
        }
    }

    #[test]
    fn tables_over_the_limits() {
        let mut b = residual();
        while b.tensors.len() <= MAX_TENSORS {
            b.tensors.push(T {
                dims: [1, 1, 1],
                offset: 0,
                scale: 1.0,
                zp: 0,
            });
        }
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Header {
                field: "tensor_count"
            })
        );
        let mut b = residual();
        b.tensors.truncate(MAX_TENSORS);
        b.layers.clear();
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Header {
                field: "layer_count"
            })
        );
    }

    #[test]
    fn offsets_that_disagree_with_zero_points() {
        let layer = |i: u16, field| Some(ModelError::Layer { index: i, field });
        let mut b = residual();
        b.layers[0].offsets.1 += 1;
        assert_eq!(parse_err(&b), layer(0, "output_offset"));
        let mut b = residual();
        b.layers[5].offsets.0 -= 1;
        assert_eq!(parse_err(&b), layer(5, "input_offset"));
        let mut b = residual();
        let at = b.layers[3].data[2];
        b.set_i32(at, 3, 1); // input2_offset
        assert_eq!(parse_err(&b), layer(3, "input2_offset"));
        let mut b = residual();
        b.tensors[5].zp += 1;
        assert_eq!(parse_err(&b), layer(4, "zero_point"));
    }

    #[test]
    fn sizes_that_overflow_32_bits_and_reserved_bytes() {
        // 255x255 kernel over 4 channels: the filter length no longer matches.
        let mut b = residual();
        b.layers[1].geom = [255, 255, 1, 1, 127, 127];
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Layer {
                index: 1,
                field: "filter"
            })
        );
        // A tensor of 65535^3 elements.
        let mut b = residual();
        b.tensors[2].dims = [u16::MAX; 3];
        assert_eq!(
            parse_err(&b),
            Some(ModelError::Tensor {
                index: 2,
                field: "dims"
            })
        );
        let mut bytes = residual().bytes();
        bytes[62] = 1;
        format::seal(&mut bytes);
        assert_eq!(
            with_model(&bytes, |r| r.err()),
            Some(ModelError::Header { field: "reserved" })
        );
    }

    /// `bytes` with header field `at` (a u16) set to `v`, resealed.
    fn with_u16(mut bytes: Vec<u8>, at: usize, v: u16) -> Vec<u8> {
        bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
        format::seal(&mut bytes);
        bytes
    }

    #[test]
    fn class_names_are_read_and_checked() {
        let bytes = residual().bytes();
        with_model(&bytes, |m| {
            let m = m.unwrap();
            assert_eq!(m.class_count(), 10);
            assert_eq!(m.class_name(0), Some("class 0"));
            assert_eq!(m.class_name(9), Some("class 9"));
            assert_eq!(m.class_name(10), None);
            assert_eq!(m.class_names().last(), Some("class 9"));
        });
        let err = |b: &[u8]| with_model(b, |r| r.err());
        let header = |field| Some(ModelError::Header { field });
        // Class count: not the number of logits, under 2, over 100.
        for n in [9, 11, 1, 0, 101] {
            assert_eq!(
                err(&with_u16(bytes.clone(), 60, n)),
                header("class_count"),
                "{n}"
            );
        }
        // The table past the end of the blob.
        let mut b = bytes.clone();
        let past = b.len() as u32 - 64;
        b[56..60].copy_from_slice(&past.to_le_bytes());
        format::seal(&mut b);
        assert_eq!(err(&b), header("class_table"));
        // A name that is not UTF-8, holds a control character, is empty or
        // has bytes after its end.
        let at = u32::from_le_bytes(bytes[56..60].try_into().unwrap()) as usize;
        for (i, patch) in [
            (3, &[0xffu8][..]),
            (4, b"\n"),
            (5, &[0]),
            (6, &[0, 0, b'x']),
        ] {
            let mut b = bytes.clone();
            let name = at + i * CLASS_NAME_LEN;
            b[name..name + patch.len()].copy_from_slice(patch);
            format::seal(&mut b);
            assert_eq!(
                err(&b),
                Some(ModelError::ClassName { index: i as u16 }),
                "class {i}"
            );
        }
        // A version 1 blob: an error that names both versions.
        let e = err(&with_u16(bytes.clone(), 4, 1)).unwrap();
        assert_eq!(
            e,
            ModelError::Version {
                found: 1,
                supported: 2
            }
        );
        let text = std::format!("{e}");
        assert!(
            text.contains("version 1") && text.contains("version 2"),
            "{text}"
        );
    }
}
