//! The model blob format, defined once: its constants, the header and the
//! tensor and layer records, each with `decode` (the reader,
//! [`Model::parse`](super::Model::parse)) and `encode` (the writer,
//! `host-trainer`'s exporter, and the hand-built blobs of the tests) made
//! from one field table, so the two cannot drift apart. The unit tests
//! re-encode every record of the shipped blob to the identical bytes.
//!
//! # Layout (version 2, little-endian)
//!
//! A [`Header`] of [`HEADER_LEN`] bytes, then the sections it points to,
//! in the order [`Header::layout`] places them, each 4-byte aligned:
//!
//! 1. provenance text (UTF-8 `key=value` lines), zero-padded to 4 bytes;
//! 2. the class names: one [`CLASS_NAME_LEN`]-byte field per logit, in
//!    label order, each UTF-8, zero-padded ([`class_name_field`]);
//! 3. the tensor table: [`TensorRecord`]s of [`TENSOR_RECORD_LEN`] bytes;
//! 4. the layer table: [`LayerRecord`]s of [`LAYER_RECORD_LEN`] bytes;
//! 5. the data section: the layers' weights, biases and requantization
//!    arrays (`i8` filters, `i32` tables at 4-byte aligned offsets).
//!
//! The CRC-32 (IEEE) at [`CRC_AT`] covers bytes [`CRC_FROM`]`..` of the
//! blob ([`seal`] writes it). A record's fields tile it exactly, reserved
//! bytes included (checked at compile time); reserved bytes are zero.
//!
//! What the reader accepts beyond the layout (ranges, shapes, dataflow) is
//! in `validate.rs`.

/// Blob magic.
pub const MAGIC: [u8; 4] = *b"MRN8";
/// The one blob format this code reads. Version 1 had no class names.
pub const FORMAT_VERSION: u16 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Length of one tensor record.
pub const TENSOR_RECORD_LEN: usize = 24;
/// Length of one layer record.
pub const LAYER_RECORD_LEN: usize = 64;
/// Length of a layer name field.
pub const NAME_LEN: usize = 16;
/// Length of a class name field.
pub const CLASS_NAME_LEN: usize = 32;
/// Fewest classes a model may have.
pub const MIN_CLASSES: usize = 2;
/// Most classes a model may have.
pub const MAX_CLASSES: usize = 100;
/// "No tensor" in a layer record.
pub const NO_TENSOR: u16 = 0xFFFF;
/// Where the header stores the CRC-32.
pub const CRC_AT: usize = 12;
/// The CRC-32 covers the blob from this byte on.
pub const CRC_FROM: usize = 16;
/// Number of `i32` [`AddParams`](crate::kernels::AddParams) an `Add` layer
/// keeps at its [`LayerRecord::bias`] offset.
pub const ADD_PARAMS_LEN: usize = 10;

/// Layer operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Op {
    /// [`conv2d_s8`](crate::kernels::conv2d_s8).
    Conv = 1,
    /// [`maxpool_s8`](crate::kernels::maxpool_s8).
    MaxPool = 2,
    /// [`avgpool_s8`](crate::kernels::avgpool_s8).
    AvgPool = 3,
    /// [`add_s8`](crate::kernels::add_s8).
    Add = 4,
    /// [`fc_s8`](crate::kernels::fc_s8).
    FullyConnected = 5,
}

impl Op {
    /// The op with code `v`, if any.
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Conv,
            2 => Op::MaxPool,
            3 => Op::AvgPool,
            4 => Op::Add,
            5 => Op::FullyConnected,
            _ => return None,
        })
    }
}

/// A fixed-size little-endian field of a record.
trait Field: Sized {
    /// Bytes it takes.
    const SIZE: usize;
    fn get(b: &[u8], at: usize) -> Self;
    fn put(self, b: &mut [u8], at: usize);
}

macro_rules! le_field {
    ($($ty:ty),*) => {$(
        impl Field for $ty {
            const SIZE: usize = core::mem::size_of::<$ty>();
            #[inline(always)]
            fn get(b: &[u8], at: usize) -> Self {
                let mut a = [0u8; core::mem::size_of::<$ty>()];
                a.copy_from_slice(&b[at..at + Self::SIZE]);
                <$ty>::from_le_bytes(a)
            }
            #[inline(always)]
            fn put(self, b: &mut [u8], at: usize) {
                b[at..at + Self::SIZE].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le_field!(u8, i8, u16, u32, i32);

impl Field for f32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn get(b: &[u8], at: usize) -> Self {
        f32::from_bits(u32::get(b, at))
    }
    #[inline(always)]
    fn put(self, b: &mut [u8], at: usize) {
        self.to_bits().put(b, at);
    }
}

impl<const N: usize> Field for [u8; N] {
    const SIZE: usize = N;
    #[inline(always)]
    fn get(b: &[u8], at: usize) -> Self {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[at..at + N]);
        a
    }
    #[inline(always)]
    fn put(self, b: &mut [u8], at: usize) {
        b[at..at + N].copy_from_slice(&self);
    }
}

/// Defines a record struct from one table of `field: type = offset`, with
/// `decode` and `encode` made from that table and a compile-time check that
/// the fields tile the record exactly, in order.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident[$len:expr] {
            $( $(#[$fmeta:meta])* $field:ident: $ty:ty = $at:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// Reads the record from its bytes.
            #[inline(always)]
            pub fn decode(b: &[u8; $len]) -> Self {
                Self { $( $field: <$ty as Field>::get(b, $at), )* }
            }

            /// Writes the record as bytes.
            pub fn encode(&self) -> [u8; $len] {
                let mut b = [0u8; $len];
                $( Field::put(self.$field, &mut b, $at); )*
                b
            }
        }

        const _: () = {
            let mut end = 0;
            $(
                assert!($at == end, concat!(stringify!($name), ".", stringify!($field), ": gap or overlap"));
                end = $at + <$ty as Field>::SIZE;
            )*
            assert!(end == $len, concat!(stringify!($name), ": fields do not fill the record"));
        };
    };
}

record! {
    /// The fixed header at the start of the blob. Offsets are from the
    /// start of the blob; counts, lengths and offsets are checked by the
    /// reader against the limits in [`super`].
    pub struct Header[HEADER_LEN] {
        /// [`MAGIC`].
        magic: [u8; 4] = 0,
        /// [`FORMAT_VERSION`].
        version: u16 = 4,
        /// [`HEADER_LEN`].
        header_len: u16 = 6,
        /// Length of the whole blob.
        total_len: u32 = 8,
        /// CRC-32 (IEEE) of bytes [`CRC_FROM`]`..total_len` ([`seal`]).
        crc: u32 = CRC_AT,
        /// Arena bytes (activation memory).
        arena_len: u32 = CRC_FROM,
        /// Conv scratch, in `i16` elements.
        scratch_len: u32 = 20,
        /// Records in the tensor table.
        tensor_count: u16 = 24,
        /// Records in the layer table.
        layer_count: u16 = 26,
        /// Index of the input tensor.
        input: u16 = 28,
        /// Index of the output (logits) tensor.
        output: u16 = 30,
        /// Offset of the provenance text.
        meta_at: u32 = 32,
        /// Length of the provenance text (without its padding).
        meta_len: u32 = 36,
        /// Offset of the tensor table.
        tensors_at: u32 = 40,
        /// Offset of the layer table.
        layers_at: u32 = 44,
        /// Offset of the data section.
        data_at: u32 = 48,
        /// Length of the data section.
        data_len: u32 = 52,
        /// Offset of the class name table.
        classes_at: u32 = 56,
        /// Class names in the table: the number of logits.
        class_count: u16 = 60,
        /// Zero.
        reserved: [u8; 2] = 62,
    }
}

record! {
    /// One activation tensor: its shape (NHWC, batch 1), its place in the
    /// arena and its quantization.
    pub struct TensorRecord[TENSOR_RECORD_LEN] {
        /// Height.
        h: u16 = 0,
        /// Width.
        w: u16 = 2,
        /// Channels.
        c: u16 = 4,
        /// Zero.
        reserved_a: u16 = 6,
        /// Byte offset in the arena.
        offset: u32 = 8,
        /// Zero.
        reserved_b: u32 = 12,
        /// Real value of one step (metadata for hosts and for display;
        /// kernels never read it).
        scale: f32 = 16,
        /// Zero point.
        zero_point: i32 = 20,
    }
}

record! {
    /// One layer: op, geometry, fused activation, tensors, offsets, and
    /// where its arrays are in the data section (offsets from its start).
    /// An `Add` keeps its [`ADD_PARAMS_LEN`] `AddParams` integers at
    /// `bias` (`input1_offset, input1_multiplier, input1_shift,
    /// input2_offset, input2_multiplier, input2_shift, left_shift,
    /// output_multiplier, output_shift, output_offset`).
    pub struct LayerRecord[LAYER_RECORD_LEN] {
        /// [`Op`] code.
        op: u8 = 0,
        /// Kernel rows.
        kernel_h: u8 = 1,
        /// Kernel columns.
        kernel_w: u8 = 2,
        /// Vertical stride.
        stride_h: u8 = 3,
        /// Horizontal stride.
        stride_w: u8 = 4,
        /// Rows of padding on each side.
        pad_h: u8 = 5,
        /// Columns of padding on each side.
        pad_w: u8 = 6,
        /// Lower output clamp.
        act_min: i8 = 7,
        /// Upper output clamp.
        act_max: i8 = 8,
        /// Zero.
        reserved_a: [u8; 3] = 9,
        /// Input tensor.
        input: u16 = 12,
        /// Second input (the residual add), else [`NO_TENSOR`].
        input2: u16 = 14,
        /// Output tensor.
        output: u16 = 16,
        /// Zero.
        reserved_b: u16 = 18,
        /// `-input_zero_point` (conv, FC).
        input_offset: i32 = 20,
        /// `output_zero_point` (conv, FC).
        output_offset: i32 = 24,
        /// Filter (`i8`).
        filter: u32 = 28,
        /// Filter length in bytes.
        filter_len: u32 = 32,
        /// Bias (`i32` per output channel), or an `Add`'s parameters.
        bias: u32 = 36,
        /// Requantization multipliers (`i32` per output channel).
        multiplier: u32 = 40,
        /// Requantization shifts (`i32` per output channel).
        shift: u32 = 44,
        /// ASCII name, zero-padded (see [`name_field`]).
        name: [u8; NAME_LEN] = 48,
    }
}

impl Header {
    /// A header with the sections laid out back to back after it: the
    /// provenance text at [`HEADER_LEN`], then (4-byte aligned) `classes`
    /// class name fields, `tensors` tensor records, `layers` layer records
    /// and `data_len` bytes of data; the total length follows. The arena,
    /// scratch, input, output and CRC are left 0. `None` if the blob would
    /// exceed 4 GiB.
    pub fn layout(
        meta_len: usize,
        classes: u16,
        tensors: u16,
        layers: u16,
        data_len: usize,
    ) -> Option<Self> {
        let meta_at = HEADER_LEN;
        let classes_at = meta_at.checked_add(meta_len)?.checked_next_multiple_of(4)?;
        let tensors_at = classes_at + classes as usize * CLASS_NAME_LEN;
        let layers_at = tensors_at + tensors as usize * TENSOR_RECORD_LEN;
        let data_at = layers_at + layers as usize * LAYER_RECORD_LEN;
        let total = data_at.checked_add(data_len)?;
        let u32_of = |v: usize| u32::try_from(v).ok();
        Some(Header {
            magic: MAGIC,
            version: FORMAT_VERSION,
            header_len: HEADER_LEN as u16,
            total_len: u32_of(total)?,
            crc: 0,
            arena_len: 0,
            scratch_len: 0,
            tensor_count: tensors,
            layer_count: layers,
            input: 0,
            output: 0,
            meta_at: meta_at as u32,
            meta_len: u32_of(meta_len)?,
            tensors_at: u32_of(tensors_at)?,
            layers_at: u32_of(layers_at)?,
            data_at: u32_of(data_at)?,
            data_len: u32_of(data_len)?,
            classes_at: u32_of(classes_at)?,
            class_count: classes,
            reserved: [0; 2],
        })
    }
}

impl TensorRecord {
    /// A record of the given shape, arena offset and quantization
    /// (reserved fields zero).
    pub fn new(dims: [u16; 3], offset: u32, scale: f32, zero_point: i32) -> Self {
        let [h, w, c] = dims;
        TensorRecord {
            h,
            w,
            c,
            reserved_a: 0,
            offset,
            reserved_b: 0,
            scale,
            zero_point,
        }
    }
}

impl LayerRecord {
    /// A record of op `op` with everything else empty: zero geometry,
    /// offsets and data references, no clamp (`-128..=127`), tensors 0 and
    /// no second input, no name. Writers fill in the rest.
    pub fn new(op: Op) -> Self {
        LayerRecord {
            op: op as u8,
            kernel_h: 0,
            kernel_w: 0,
            stride_h: 0,
            stride_w: 0,
            pad_h: 0,
            pad_w: 0,
            act_min: -128,
            act_max: 127,
            reserved_a: [0; 3],
            input: 0,
            input2: NO_TENSOR,
            output: 0,
            reserved_b: 0,
            input_offset: 0,
            output_offset: 0,
            filter: 0,
            filter_len: 0,
            bias: 0,
            multiplier: 0,
            shift: 0,
            name: [0; NAME_LEN],
        }
    }
}

/// The name field for `name`: ASCII, at most [`NAME_LEN`] bytes,
/// zero-padded; `None` otherwise.
pub fn name_field(name: &str) -> Option<[u8; NAME_LEN]> {
    if name.len() > NAME_LEN || !name.is_ascii() {
        return None;
    }
    let mut f = [0u8; NAME_LEN];
    f[..name.len()].copy_from_slice(name.as_bytes());
    Some(f)
}

/// The name bytes of an encoded layer record, in place: its name field up
/// to the first zero.
pub fn layer_name(record: &[u8; LAYER_RECORD_LEN]) -> &[u8] {
    let field = &record[LAYER_RECORD_LEN - NAME_LEN..];
    let len = field.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
    &field[..len]
}

/// Whether `name` may be a class name: 1 to [`CLASS_NAME_LEN`] bytes of
/// UTF-8 without control characters (NUL included).
pub fn class_name_ok(name: &str) -> bool {
    (1..=CLASS_NAME_LEN).contains(&name.len()) && !name.chars().any(char::is_control)
}

/// The class name field for `name` (zero-padded), `None` unless
/// [`class_name_ok`].
pub fn class_name_field(name: &str) -> Option<[u8; CLASS_NAME_LEN]> {
    if !class_name_ok(name) {
        return None;
    }
    let mut f = [0u8; CLASS_NAME_LEN];
    f[..name.len()].copy_from_slice(name.as_bytes());
    Some(f)
}

/// The class name in a field: its bytes up to the first zero, which must
/// be a valid name followed by zeros only; `None` otherwise.
pub fn class_name(field: &[u8; CLASS_NAME_LEN]) -> Option<&str> {
    let len = field.iter().position(|&c| c == 0).unwrap_or(CLASS_NAME_LEN);
    if field[len..].iter().any(|&c| c != 0) {
        return None;
    }
    let name = core::str::from_utf8(&field[..len]).ok()?;
    class_name_ok(name).then_some(name)
}

/// Writes the CRC-32 of `blob[CRC_FROM..]` into the header (the last step
/// of writing a blob). `blob` holds at least [`HEADER_LEN`] bytes.
pub fn seal(blob: &mut [u8]) {
    let crc = super::crc32(&blob[CRC_FROM..]);
    crc.put(blob, CRC_AT);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{default_model, BLOB};

    /// Every record of the shipped blob decodes and re-encodes to its own
    /// bytes, and the header's layout is the one [`Header::layout`] gives.
    #[test]
    fn shipped_blob_reencodes_to_identical_bytes() {
        let blob = &BLOB.0;
        let head: &[u8; HEADER_LEN] = blob[..HEADER_LEN].try_into().unwrap();
        let h = Header::decode(head);
        assert_eq!(&h.encode(), head);
        let laid = Header::layout(
            h.meta_len as usize,
            h.class_count,
            h.tensor_count,
            h.layer_count,
            h.data_len as usize,
        )
        .unwrap();
        assert_eq!(
            Header {
                crc: h.crc,
                arena_len: h.arena_len,
                scratch_len: h.scratch_len,
                input: h.input,
                output: h.output,
                ..laid
            },
            h
        );
        let m = default_model().unwrap();
        assert_eq!(m.class_count(), h.class_count as usize);
        for (c, name) in m.class_names().enumerate() {
            let at = h.classes_at as usize + c * CLASS_NAME_LEN;
            assert_eq!(
                blob[at..][..CLASS_NAME_LEN],
                class_name_field(name).unwrap()
            );
        }
        for t in 0..h.tensor_count as usize {
            let at = h.tensors_at as usize + t * TENSOR_RECORD_LEN;
            let rec: &[u8; TENSOR_RECORD_LEN] = blob[at..][..TENSOR_RECORD_LEN].try_into().unwrap();
            let r = TensorRecord::decode(rec);
            assert_eq!(&r.encode(), rec, "tensor {t}");
            let info = m.tensor(t as u16).unwrap();
            assert_eq!(
                TensorRecord::new(
                    [info.dims.h as u16, info.dims.w as u16, info.dims.c as u16],
                    info.offset as u32,
                    info.scale,
                    info.zero_point
                )
                .encode(),
                *rec
            );
        }
        for l in 0..h.layer_count as usize {
            let at = h.layers_at as usize + l * LAYER_RECORD_LEN;
            let rec: &[u8; LAYER_RECORD_LEN] = blob[at..][..LAYER_RECORD_LEN].try_into().unwrap();
            let r = LayerRecord::decode(rec);
            assert_eq!(&r.encode(), rec, "layer {l}");
            let name = m.layer(l as u16).unwrap().name;
            assert_eq!(layer_name(rec), name.as_bytes());
            assert_eq!(name_field(name), Some(r.name));
        }
        let mut copy = blob.to_vec();
        copy[CRC_AT..CRC_FROM].fill(0);
        seal(&mut copy);
        assert_eq!(copy, blob);
    }

    #[test]
    fn class_names() {
        let f = class_name_field("part OK").unwrap();
        assert_eq!(&f[..8], b"part OK\0");
        assert_eq!(class_name(&f), Some("part OK"));
        let f = class_name_field("Bär é 🐕").unwrap();
        assert_eq!(class_name(&f), Some("Bär é 🐕"));
        assert_eq!(
            class_name(&class_name_field(&"x".repeat(32)).unwrap()).map(str::len),
            Some(32)
        );
        for bad in ["", "a\nb", "tab\t", "nul\0", &"x".repeat(33)] {
            assert_eq!(class_name_field(bad), None, "{bad:?}");
        }
        // An empty field, bytes after the terminator, invalid UTF-8, a
        // control character: all rejected by the reader.
        let mut f = [0u8; CLASS_NAME_LEN];
        assert_eq!(class_name(&f), None);
        f[..3].copy_from_slice(b"cat");
        f[5] = b'x';
        assert_eq!(class_name(&f), None);
        f[5] = 0;
        f[1] = 0xff;
        assert_eq!(class_name(&f), None);
        f[1] = 0x07;
        assert_eq!(class_name(&f), None);
    }

    #[test]
    fn layer_names() {
        assert_eq!(name_field("layer4.2.conv2"), Some(*b"layer4.2.conv2\0\0"));
        assert_eq!(name_field("0123456789abcdef"), Some(*b"0123456789abcdef"));
        assert_eq!(name_field("0123456789abcdefg"), None);
        assert_eq!(name_field("café"), None);
        let mut r = LayerRecord::new(Op::Conv);
        r.name = *b"0123456789abcdef";
        assert_eq!(layer_name(&r.encode()), b"0123456789abcdef");
    }
}
