//! The int8 model: a versioned, checksummed blob, parsed and validated
//! without allocating, then run layer by layer through [`crate::kernels`].
//!
//! # Blob format
//!
//! A header, provenance text, the class names, a tensor table, a layer table and a data
//! section, versioned ([`FORMAT_VERSION`]) and checksummed: see [`format`],
//! which defines every field once for the reader here and the writer in
//! `host-trainer`.
//!
//! Every tensor has a fixed place in one activation arena, planned by the
//! exporter. [`Model::parse`] validates everything `run` relies on, with a
//! valid CRC or not (see `validate.rs`): the header and every table within
//! the blob and within the limits below (which the exporter enforces too);
//! every tensor inside the arena, with a positive finite scale and an int8
//! zero point; the **dataflow**: every layer reads tensors already written
//! (the input, or one earlier layer's output: each tensor is written once)
//! and not overwritten in the arena since, and the logits survive the last
//! layer; no layer's output overlaps its inputs; every kernel's parameters in
//! their documented ranges (requantization multipliers in `[2^30, 2^31)` or
//! 0, shifts in `-31..=30`), shapes that agree between producer and
//! consumer, and offsets that agree with the tensors' zero points. A bad
//! blob is an error naming the layer (or tensor) and field. After that,
//! [`Model::run`] cannot fail.
//!
//! Limits (reader and writer): at most [`MAX_TENSORS`] tensors and
//! [`MAX_LAYERS`] layers, an arena of at most [`MAX_ARENA_LEN`] bytes and a
//! scratch of at most [`MAX_SCRATCH_LEN`] `i16` elements.

mod error;
pub mod format;
#[cfg(test)]
mod fuzz;
mod generated;
mod top1;
mod validate;

pub use format::{
    Op, CLASS_NAME_LEN, FORMAT_VERSION, HEADER_LEN, LAYER_RECORD_LEN, MAGIC, MAX_CLASSES,
    MIN_CLASSES, NAME_LEN, NO_TENSOR, TENSOR_RECORD_LEN,
};

use format::{Header, LayerRecord, TensorRecord, CRC_FROM};

pub use error::ModelError;
pub use generated::{ARENA_LEN, BLOB, SCRATCH_LEN, SCRATCH_LEN_FAST};
pub use top1::{argmax, top1};

/// An `i16` scratch buffer with 4-byte alignment, so the fast conv reads
/// its columns with aligned word loads (it realigns any other buffer by one
/// element when it can, else it takes the portable path).
#[derive(Debug)]
#[repr(C, align(4))]
pub struct Scratch<const N: usize>(pub [i16; N]);

impl<const N: usize> Scratch<N> {
    /// A zeroed buffer.
    pub const fn new() -> Self {
        Self([0; N])
    }
}

impl<const N: usize> Default for Scratch<N> {
    fn default() -> Self {
        Self::new()
    }
}

use core::ops::Range;

use crate::kernels::{
    add_s8, avgpool_s8, conv2d_s8, fc_s8, maxpool_s8, AddParams, Conv2d, Conv2dParams, Dims,
    FullyConnected, PoolParams, Requant,
};
use crate::preprocess::INPUT_LEN;

#[cfg(target_endian = "big")]
compile_error!("the model blob is little-endian and is viewed in place");

/// The model committed in `shared/src/model/generated/`, parsed and
/// validated.
pub fn default_model() -> Result<Model<'static>, ModelError> {
    Model::parse(&BLOB.0)
}

/// Most tensors a blob may have (the exporter refuses more).
pub const MAX_TENSORS: usize = 1024;
/// Most layers a blob may have (the exporter refuses more).
pub const MAX_LAYERS: usize = 1024;
/// Largest activation arena, in bytes: the STM32H743's 1 MiB of SRAM (no
/// buffer larger than that exists on the target).
pub const MAX_ARENA_LEN: usize = 1 << 20;
/// Largest conv scratch, in `i16` elements (1 MiB, as [`MAX_ARENA_LEN`]).
pub const MAX_SCRATCH_LEN: usize = 1 << 19;

/// CRC-32 (IEEE 802.3, as zlib) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    CRC.checksum(bytes)
}

/// A blob with 16-byte alignment, so its `i32` arrays can be viewed in place.
#[derive(Debug)]
#[repr(C, align(16))]
pub struct Aligned<T: ?Sized>(pub T);

/// One activation tensor of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorInfo {
    /// Shape (NHWC, batch 1).
    pub dims: Dims,
    /// Byte offset in the arena.
    pub offset: usize,
    /// Real value of one step (metadata; kernels never use it).
    pub scale: f32,
    /// Zero point.
    pub zero_point: i32,
}

impl TensorInfo {
    /// The tensor's bytes in the arena.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.dims.len()
    }
}

/// One layer, decoded, with views into the blob.
#[derive(Debug, Clone, Copy)]
pub struct Layer<'a> {
    /// Layer name (e.g. `layer2.0.conv1`).
    pub name: &'a str,
    /// Input tensor.
    pub input: u16,
    /// Second input (the residual add), else [`NO_TENSOR`].
    pub input2: u16,
    /// Output tensor.
    pub output: u16,
    /// What it computes.
    pub kind: LayerKind<'a>,
}

/// The operation of a [`Layer`] with its parameters.
#[derive(Debug, Clone, Copy)]
pub enum LayerKind<'a> {
    /// Convolution.
    Conv(Conv2d<'a>),
    /// Max pool.
    MaxPool(PoolParams),
    /// Average pool.
    AvgPool(PoolParams),
    /// Residual add.
    Add(AddParams),
    /// Fully connected.
    FullyConnected(FullyConnected<'a>),
}

impl LayerKind<'_> {
    /// The op code.
    pub fn op(&self) -> Op {
        match self {
            LayerKind::Conv(_) => Op::Conv,
            LayerKind::MaxPool(_) => Op::MaxPool,
            LayerKind::AvgPool(_) => Op::AvgPool,
            LayerKind::Add(_) => Op::Add,
            LayerKind::FullyConnected(_) => Op::FullyConnected,
        }
    }
}

/// A validated model, borrowing its blob.
#[derive(Debug, Clone)]
pub struct Model<'a> {
    blob: &'a [u8],
    arena_len: usize,
    scratch_len: usize,
    n_tensors: u16,
    n_layers: u16,
    input: u16,
    output: u16,
    meta: &'a str,
    classes_at: usize,
    class_count: u16,
    tensors_at: usize,
    layers_at: usize,
    data: Range<usize>,
}

/// `start..start + len` if it lies within `0..limit`.
fn span(start: usize, len: usize, limit: usize) -> Option<Range<usize>> {
    let end = start.checked_add(len)?;
    (end <= limit).then_some(start..end)
}

/// The `N`-byte record at `at` of `b`.
fn record_at<const N: usize>(b: &[u8], at: usize) -> &[u8; N] {
    b[at..at + N]
        .try_into()
        .expect("a range of N bytes is an N-byte array")
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The header of `blob` once the blob is known whole and undamaged: long
/// enough, of this format and version, as long as it says, with a matching
/// CRC, and 4-byte aligned in memory. Its other fields are not checked yet.
fn check_envelope(blob: &[u8]) -> Result<Header, ModelError> {
    let Some(head) = blob.first_chunk::<HEADER_LEN>() else {
        return Err(ModelError::Truncated {
            needed: HEADER_LEN,
            actual: blob.len(),
        });
    };
    let h = Header::decode(head);
    if h.magic != MAGIC {
        return Err(ModelError::Magic);
    }
    if h.version != FORMAT_VERSION {
        return Err(ModelError::Version {
            found: h.version,
            supported: FORMAT_VERSION,
        });
    }
    if h.header_len as usize != HEADER_LEN {
        return Err(ModelError::Header {
            field: "header_len",
        });
    }
    let total = h.total_len as usize;
    if blob.len() < total {
        return Err(ModelError::Truncated {
            needed: total,
            actual: blob.len(),
        });
    }
    if blob.len() > total {
        return Err(ModelError::Length {
            declared: total,
            actual: blob.len(),
        });
    }
    let computed = crc32(&blob[CRC_FROM..]);
    if h.crc != computed {
        return Err(ModelError::Checksum {
            stored: h.crc,
            computed,
        });
    }
    if !(blob.as_ptr() as usize).is_multiple_of(4) {
        return Err(ModelError::Alignment);
    }
    Ok(h)
}

impl<'a> Model<'a> {
    /// Parses and fully validates `blob`. Nothing is allocated; the model
    /// keeps borrowing `blob`.
    pub fn parse(blob: &'a [u8]) -> Result<Model<'a>, ModelError> {
        let h = check_envelope(blob)?;
        let header = |field: &'static str| ModelError::Header { field };
        let total = blob.len();
        let (arena_len, scratch_len) = (h.arena_len as usize, h.scratch_len as usize);
        let (n_tensors, n_layers) = (h.tensor_count, h.layer_count);
        let (tensors_at, layers_at) = (h.tensors_at as usize, h.layers_at as usize);
        if arena_len > MAX_ARENA_LEN {
            return Err(header("arena_len"));
        }
        if scratch_len > MAX_SCRATCH_LEN {
            return Err(header("scratch_len"));
        }
        if n_tensors as usize > MAX_TENSORS {
            return Err(header("tensor_count"));
        }
        if n_layers == 0 || n_layers as usize > MAX_LAYERS {
            return Err(header("layer_count"));
        }
        if h.reserved.iter().any(|&b| b != 0) {
            return Err(header("reserved"));
        }
        let meta = span(h.meta_at as usize, h.meta_len as usize, total).ok_or(header("meta"))?;
        let m = Model {
            blob,
            arena_len,
            scratch_len,
            n_tensors,
            n_layers,
            input: h.input,
            output: h.output,
            meta: core::str::from_utf8(&blob[meta]).map_err(|_| header("meta"))?,
            classes_at: h.classes_at as usize,
            class_count: h.class_count,
            tensors_at,
            layers_at,
            data: span(h.data_at as usize, h.data_len as usize, total).ok_or(header("data"))?,
        };
        if !(MIN_CLASSES..=MAX_CLASSES).contains(&(h.class_count as usize)) {
            return Err(header("class_count"));
        }
        span(m.classes_at, h.class_count as usize * CLASS_NAME_LEN, total)
            .ok_or(header("class_table"))?;
        span(tensors_at, n_tensors as usize * TENSOR_RECORD_LEN, total)
            .ok_or(header("tensor_table"))?;
        span(layers_at, n_layers as usize * LAYER_RECORD_LEN, total)
            .ok_or(header("layer_table"))?;
        if !(m.data.start.is_multiple_of(4)
            && m.classes_at.is_multiple_of(4)
            && tensors_at.is_multiple_of(4)
            && layers_at.is_multiple_of(4))
        {
            return Err(header("alignment"));
        }
        if m.input >= n_tensors || m.output >= n_tensors || m.input == m.output {
            return Err(header("input_output"));
        }
        m.validate()?;
        m.validate_classes()?;
        Ok(m)
    }

    /// Every class name is valid, and there is one per logit.
    fn validate_classes(&self) -> Result<(), ModelError> {
        if self.output().dims.len() != self.class_count as usize {
            return Err(ModelError::Header {
                field: "class_count",
            });
        }
        for index in 0..self.class_count {
            if self.class_name(index as usize).is_none() {
                return Err(ModelError::ClassName { index });
            }
        }
        Ok(())
    }

    /// Number of classes: the number of logits.
    pub fn class_count(&self) -> usize {
        self.class_count as usize
    }

    /// The name of class `i` (label order), `None` past the last class.
    pub fn class_name(&self, i: usize) -> Option<&'a str> {
        if i >= self.class_count as usize {
            return None;
        }
        let at = self.classes_at + i * CLASS_NAME_LEN;
        format::class_name(record_at(self.blob, at))
    }

    /// The class names in label order.
    pub fn class_names(&self) -> impl Iterator<Item = &'a str> + '_ {
        (0..self.class_count()).filter_map(|i| self.class_name(i))
    }

    /// Provenance text (`key=value` lines): recipe, data set, accuracy, …
    pub fn meta(&self) -> &'a str {
        self.meta
    }

    /// The value of provenance key `key`.
    pub fn meta_value(&self, key: &str) -> Option<&'a str> {
        self.meta().lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// Arena bytes [`run`](Self::run) needs.
    pub fn arena_len(&self) -> usize {
        self.arena_len
    }

    /// Scratch `i16` elements [`run`](Self::run) needs.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// Scratch `i16` elements (4-byte aligned, see [`Scratch`]) that let
    /// every conv take the fast kernel's fastest path
    /// ([`conv2d_s8_fast_scratch_len`](crate::kernels::conv2d_s8_fast_scratch_len)):
    /// for the shipped model, [`SCRATCH_LEN_FAST`]. Any scratch of at least
    /// [`scratch_len`](Self::scratch_len) gives the same bytes.
    pub fn fast_scratch_len(&self) -> usize {
        self.layers()
            .filter_map(|l| match l.kind {
                LayerKind::Conv(c) => Some(crate::kernels::conv2d_s8_fast_scratch_len(
                    &c.params,
                    self.tensor_at(l.input).dims,
                )),
                _ => None,
            })
            .fold(self.scratch_len, usize::max)
    }

    /// Number of layers.
    pub fn layer_count(&self) -> u16 {
        self.n_layers
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> u16 {
        self.n_tensors
    }

    /// Index of the input tensor.
    pub fn input_index(&self) -> u16 {
        self.input
    }

    /// Index of the output (logits) tensor.
    pub fn output_index(&self) -> u16 {
        self.output
    }

    /// The input tensor.
    pub fn input(&self) -> TensorInfo {
        self.tensor_at(self.input)
    }

    /// The output (logits) tensor.
    pub fn output(&self) -> TensorInfo {
        self.tensor_at(self.output)
    }

    /// Tensor `i`, or `None` unless `i < tensor_count()`.
    pub fn tensor(&self, i: u16) -> Option<TensorInfo> {
        (i < self.n_tensors).then(|| self.tensor_at(i))
    }

    /// Tensor `i`, for an index checked by `parse` (the input, the output,
    /// a layer's tensors) or by the caller. Reads the record at `i` without
    /// comparing `i` with the tensor count (the slice index still checks it
    /// against the blob).
    fn tensor_at(&self, i: u16) -> TensorInfo {
        let r = self.tensor_record(i);
        TensorInfo {
            dims: Dims::new(r.h as usize, r.w as usize, r.c as usize),
            offset: r.offset as usize,
            scale: r.scale,
            zero_point: r.zero_point,
        }
    }

    /// The record of tensor `i` (the index unchecked, as for
    /// [`tensor_at`](Self::tensor_at)).
    fn tensor_record(&self, i: u16) -> TensorRecord {
        TensorRecord::decode(record_at(
            self.blob,
            self.tensors_at + i as usize * TENSOR_RECORD_LEN,
        ))
    }

    /// The encoded record of layer `i` (the index unchecked against the
    /// layer count; the slice index still checks it against the blob).
    fn layer_bytes(&self, i: u16) -> &'a [u8; LAYER_RECORD_LEN] {
        record_at(self.blob, self.layers_at + i as usize * LAYER_RECORD_LEN)
    }

    /// Layer `i`, decoded, or `None` unless `i < layer_count()`.
    pub fn layer(&self, i: u16) -> Option<Layer<'a>> {
        // `parse` decoded every layer, so this fails only on the index.
        self.decode_layer(i).ok()
    }

    /// The layers in execution order: all [`layer_count`](Self::layer_count)
    /// of them (`parse` decoded each).
    pub fn layers(&self) -> impl Iterator<Item = Layer<'a>> + '_ {
        (0..self.n_layers).filter_map(|i| self.layer(i))
    }

    /// An `i8` array of `len` at data offset `off`.
    fn i8s(&self, off: usize, len: usize) -> Option<&'a [i8]> {
        let r = span(self.data.start.checked_add(off)?, len, self.data.end)?;
        let bytes: &'a [u8] = &self.blob[r];
        Some(bytemuck::cast_slice(bytes))
    }

    /// An `i32` array of `len` at data offset `off` (4-byte aligned).
    fn i32s(&self, off: usize, len: usize) -> Option<&'a [i32]> {
        let r = span(
            self.data.start.checked_add(off)?,
            len.checked_mul(4)?,
            self.data.end,
        )?;
        bytemuck::try_cast_slice(&self.blob[r]).ok()
    }

    fn decode_layer(&self, i: u16) -> Result<Layer<'a>, ModelError> {
        let bad = |field| ModelError::Layer { index: i, field };
        if i >= self.n_layers {
            return Err(bad("index"));
        }
        let rec = self.layer_bytes(i);
        let r = LayerRecord::decode(rec);
        let op = Op::from_u8(r.op).ok_or(bad("op"))?;
        let name = core::str::from_utf8(format::layer_name(rec)).map_err(|_| bad("name"))?;
        let (input, input2, output) = (r.input, r.input2, r.output);
        let (act_min, act_max) = (r.act_min, r.act_max);
        let pool = PoolParams {
            kernel_h: r.kernel_h as usize,
            kernel_w: r.kernel_w as usize,
            stride_h: r.stride_h as usize,
            stride_w: r.stride_w as usize,
            pad_h: r.pad_h as usize,
            pad_w: r.pad_w as usize,
            act_min,
            act_max,
        };
        let (input_offset, output_offset) = (r.input_offset, r.output_offset);
        let (filter_off, filter_len) = (r.filter as usize, r.filter_len as usize);
        let (bias_off, mult_off, shift_off) =
            (r.bias as usize, r.multiplier as usize, r.shift as usize);
        let out_c = self.tensor(output).ok_or(bad("output"))?.dims.c;
        let kind = match op {
            Op::Conv => LayerKind::Conv(Conv2d {
                params: Conv2dParams {
                    kernel_h: pool.kernel_h,
                    kernel_w: pool.kernel_w,
                    stride_h: pool.stride_h,
                    stride_w: pool.stride_w,
                    pad_h: pool.pad_h,
                    pad_w: pool.pad_w,
                    input_offset,
                    output_offset,
                    act_min,
                    act_max,
                },
                filter: self.i8s(filter_off, filter_len).ok_or(bad("filter"))?,
                bias: self.i32s(bias_off, out_c).ok_or(bad("bias"))?,
                requant: Requant {
                    multiplier: self.i32s(mult_off, out_c).ok_or(bad("multiplier"))?,
                    shift: self.i32s(shift_off, out_c).ok_or(bad("shift"))?,
                },
            }),
            Op::MaxPool => LayerKind::MaxPool(pool),
            Op::AvgPool => LayerKind::AvgPool(pool),
            Op::Add => {
                let p = self
                    .i32s(bias_off, format::ADD_PARAMS_LEN)
                    .ok_or(bad("add_params"))?;
                let mut a = [0i32; format::ADD_PARAMS_LEN];
                a.copy_from_slice(p);
                LayerKind::Add(AddParams::from_array(a, act_min, act_max))
            }
            Op::FullyConnected => LayerKind::FullyConnected(FullyConnected {
                filter: self.i8s(filter_off, filter_len).ok_or(bad("filter"))?,
                bias: self.i32s(bias_off, out_c).ok_or(bad("bias"))?,
                requant: Requant {
                    multiplier: self.i32s(mult_off, out_c).ok_or(bad("multiplier"))?,
                    shift: self.i32s(shift_off, out_c).ok_or(bad("shift"))?,
                },
                input_offset,
                output_offset,
                act_min,
                act_max,
            }),
        };
        if op != Op::Add && input2 != NO_TENSOR {
            return Err(bad("input2"));
        }
        Ok(Layer {
            name,
            input,
            input2,
            output,
            kind,
        })
    }

    fn check_buffers(&self, arena: &[i8], scratch: &[i16]) -> Result<(), ModelError> {
        if arena.len() < self.arena_len {
            return Err(ModelError::Buffer {
                buffer: "arena",
                needed: self.arena_len,
                actual: arena.len(),
            });
        }
        if scratch.len() < self.scratch_len {
            return Err(ModelError::Buffer {
                buffer: "scratch",
                needed: self.scratch_len,
                actual: scratch.len(),
            });
        }
        Ok(())
    }

    /// Writes the network input into the arena.
    pub fn load_input(&self, input: &[i8], arena: &mut [i8]) -> Result<(), ModelError> {
        let t = self.input();
        if input.len() != INPUT_LEN {
            return Err(ModelError::Buffer {
                buffer: "input",
                needed: INPUT_LEN,
                actual: input.len(),
            });
        }
        let actual = arena.len();
        let dst = arena.get_mut(t.range()).ok_or(ModelError::Buffer {
            buffer: "arena",
            needed: self.arena_len,
            actual,
        })?;
        dst.copy_from_slice(input);
        Ok(())
    }

    /// Runs layer `i` on the arena (for per-layer measurements and tests;
    /// [`run`](Self::run) calls it for every layer in order).
    pub fn run_layer(
        &self,
        i: u16,
        arena: &mut [i8],
        scratch: &mut [i16],
    ) -> Result<(), ModelError> {
        self.check_buffers(arena, scratch)?;
        let layer = self.decode_layer(i)?;
        let kernel = |error| ModelError::Kernel { index: i, error };
        let (in0, out) = (self.tensor_at(layer.input), self.tensor_at(layer.output));
        let (lo, rest) = arena.split_at_mut(out.offset);
        let (dst, hi) = rest.split_at_mut(out.dims.len());
        let (lo, hi): (&[i8], &[i8]) = (lo, hi);
        // Parse checked that inputs and output do not overlap.
        let view = |t: TensorInfo| -> &[i8] {
            if t.offset + t.dims.len() <= out.offset {
                &lo[t.range()]
            } else {
                let start = t.offset - (out.offset + out.dims.len());
                &hi[start..start + t.dims.len()]
            }
        };
        let src = view(in0);
        match &layer.kind {
            LayerKind::Conv(conv) => {
                conv2d_s8(conv, src, in0.dims, dst, out.dims, scratch).map_err(kernel)
            }
            LayerKind::MaxPool(p) => maxpool_s8(p, src, in0.dims, dst, out.dims).map_err(kernel),
            LayerKind::AvgPool(p) => avgpool_s8(p, src, in0.dims, dst, out.dims).map_err(kernel),
            LayerKind::Add(p) => {
                add_s8(p, src, view(self.tensor_at(layer.input2)), dst).map_err(kernel)
            }
            LayerKind::FullyConnected(fc) => fc_s8(fc, src, dst).map_err(kernel),
        }
    }

    /// Runs the whole network on a preprocessed input (see
    /// [`crate::preprocess`]) and copies the int8 logits into `logits`.
    ///
    /// `arena` needs [`arena_len`](Self::arena_len) bytes and `scratch`
    /// [`scratch_len`](Self::scratch_len) elements.
    pub fn run(
        &self,
        input: &[i8],
        arena: &mut [i8],
        scratch: &mut [i16],
        logits: &mut [i8],
    ) -> Result<(), ModelError> {
        self.check_buffers(arena, scratch)?;
        let out = self.output();
        if logits.len() != out.dims.len() {
            return Err(ModelError::Buffer {
                buffer: "logits",
                needed: out.dims.len(),
                actual: logits.len(),
            });
        }
        self.load_input(input, arena)?;
        for i in 0..self.n_layers {
            self.run_layer(i, arena, scratch)?;
        }
        logits.copy_from_slice(&arena[out.range()]);
        Ok(())
    }
}
