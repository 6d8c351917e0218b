//! [`ModelError`]: what is wrong with a model blob, naming the layer or
//! tensor and the field.

use super::CLASS_NAME_LEN;
use crate::error::Error;

/// What is wrong with a model blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ModelError {
    /// The blob is shorter than its header or than the length it declares.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The blob does not start with [`MAGIC`](super::MAGIC).
    Magic,
    /// The blob's format version is not [`FORMAT_VERSION`](super::FORMAT_VERSION).
    Version {
        /// Version in the blob.
        found: u16,
        /// Version this code reads.
        supported: u16,
    },
    /// The blob is longer than its header says.
    Length {
        /// Length in the header.
        declared: usize,
        /// Actual length.
        actual: usize,
    },
    /// The checksum does not match: the blob is damaged.
    Checksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// The blob is not 4-byte aligned in memory.
    Alignment,
    /// A header field is out of range.
    Header {
        /// The field.
        field: &'static str,
    },
    /// A tensor record is invalid.
    Tensor {
        /// Tensor index.
        index: u16,
        /// The field.
        field: &'static str,
    },
    /// A class name is empty, too long, not UTF-8 or holds control
    /// characters.
    ClassName {
        /// Class index.
        index: u16,
    },
    /// A layer record is invalid.
    Layer {
        /// Layer index.
        index: u16,
        /// The field.
        field: &'static str,
    },
    /// A layer reads a tensor that neither the network input nor an earlier
    /// layer wrote.
    Unwritten {
        /// Layer index.
        layer: u16,
        /// The layer's field naming the tensor (`"input"`, `"input2"`).
        field: &'static str,
        /// Tensor index.
        tensor: u16,
    },
    /// A tensor is overwritten in the arena (by a layer writing an
    /// overlapping tensor) between being written and being read.
    Overwritten {
        /// The reading layer, or `None` for the logits read after the network.
        layer: Option<u16>,
        /// The reader's field naming the tensor (`"input"`, `"input2"`, `"output"`).
        field: &'static str,
        /// Tensor index.
        tensor: u16,
        /// The layer whose output overwrites it.
        by: u16,
    },
    /// A layer's parameters fail the kernel's own validation.
    Kernel {
        /// Layer index.
        index: u16,
        /// The kernel's error.
        error: Error,
    },
    /// A buffer passed to [`Model::run`](super::Model::run) is too small.
    Buffer {
        /// Which buffer (`"arena"`, `"scratch"`, `"input"`, `"logits"`).
        buffer: &'static str,
        /// Length needed.
        needed: usize,
        /// Length passed.
        actual: usize,
    },
}

impl core::fmt::Display for ModelError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ModelError::Truncated { needed, actual } => {
                write!(f, "model blob is truncated: {actual} bytes, needs {needed}")
            }
            ModelError::Magic => write!(f, "not a model blob (bad magic)"),
            ModelError::Version { found, supported } => write!(
                f,
                "model blob format version {found} is not supported (this build reads version {supported}); re-export the model"
            ),
            ModelError::Length { declared, actual } => {
                write!(f, "model blob is {actual} bytes but its header says {declared}")
            }
            ModelError::Checksum { stored, computed } => write!(
                f,
                "model blob is damaged: CRC-32 {computed:#010x} does not match the stored {stored:#010x}"
            ),
            ModelError::Alignment => write!(f, "model blob is not 4-byte aligned in memory"),
            ModelError::Header { field } => write!(f, "model header field `{field}` is invalid"),
            ModelError::Tensor { index, field } => write!(f, "tensor {index}: field `{field}` is invalid"),
            ModelError::ClassName { index } => write!(
                f,
                "class {index}: the name is not 1 to {CLASS_NAME_LEN} bytes of UTF-8 without control characters"
            ),
            ModelError::Layer { index, field } => write!(f, "layer {index}: field `{field}` is invalid"),
            ModelError::Unwritten { layer, field, tensor } => write!(
                f,
                "layer {layer}: `{field}` reads tensor {tensor}, which no earlier layer writes"
            ),
            ModelError::Overwritten { layer: Some(layer), field, tensor, by } => write!(
                f,
                "layer {layer}: `{field}` reads tensor {tensor}, which layer {by} overwrites in the arena before"
            ),
            ModelError::Overwritten { layer: None, field, tensor, by } => write!(
                f,
                "model `{field}`: the logits (tensor {tensor}) are overwritten in the arena by layer {by}"
            ),
            ModelError::Kernel { index, error } => write!(f, "layer {index}: {error}"),
            ModelError::Buffer { buffer, needed, actual } => {
                write!(f, "`{buffer}` has {actual} elements, the model needs {needed}")
            }
        }
    }
}

impl core::error::Error for ModelError {}
