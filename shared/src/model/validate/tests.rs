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
