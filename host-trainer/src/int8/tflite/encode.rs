//! Writing a [`Net`] as a `.tflite` flatbuffer with the `flatbuffers`
//! crate and the flatc-generated [`schema`](super::schema) module.

use anyhow::{Context, Result};
use flatbuffers::{FlatBufferBuilder, Push, PushAlignment, UnionWIPOffset, WIPOffset};
use shared::model::Model;

use super::plan::{plan, Net, OpSpec, Options, Quant, TensorSpec};
use super::schema::tflite as fb;

/// Name of the metadata entry holding the class names, one per line, in
/// output order.
pub const CLASS_NAMES_METADATA: &str = "class_names";
/// Name of the metadata entry holding the blob's provenance text.
pub const PROVENANCE_METADATA: &str = "mini_resnet_provenance";

/// What an export wrote and how exactly TFLM will follow the blob.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// TFLite ops (PAD/PADV2 included).
    pub ops: usize,
    /// Tensors (activations and constants).
    pub tensors: usize,
    /// Conv/FC channels.
    pub channels: usize,
    /// Channels whose multiplier TFLM cannot derive exactly (see
    /// [`Net::inexact_channels`]).
    pub inexact_channels: usize,
    /// ADD layers TFLM parameterizes differently.
    pub inexact_adds: usize,
}

impl ExportReport {
    /// Whether TFLM derives every multiplier, shift and ADD parameter of
    /// the blob exactly.
    pub fn exact(&self) -> bool {
        self.inexact_channels == 0 && self.inexact_adds == 0
    }

    /// A warning when not [`exact`](Self::exact).
    pub fn warning(&self) -> Option<String> {
        (!self.exact()).then(|| {
            format!(
                "{} of {} conv/FC channel multipliers and {} ADD layers cannot be derived by TFLM from \
                 float32 scales (a blob exported before host-trainer rounded every scale to float32 \
                 first): TFLM will requantize them with the nearest multiplier, so some outputs may \
                 differ by one step; re-export the blob from its checkpoint",
                self.inexact_channels, self.channels, self.inexact_adds
            )
        })
    }
}

/// The `.tflite` bytes of `model`, with its class names (in output order,
/// from the blob) in the description and the [`CLASS_NAMES_METADATA`] entry, and the blob's
/// provenance in [`PROVENANCE_METADATA`].
pub fn export_tflite(model: &Model<'_>) -> Result<(Vec<u8>, ExportReport)> {
    let class_names: Vec<&str> = model.class_names().collect();
    let net = plan(model).context("converting the model blob to TFLite ops")?;
    let report = ExportReport {
        ops: net.ops.len(),
        tensors: net.tensors.len(),
        channels: net.channels,
        inexact_channels: net.inexact_channels,
        inexact_adds: net.inexact_adds,
    };
    let description = format!(
        "Mini-ResNet int8 (host-trainer, TFLM arithmetic); classes: {}",
        class_names.join(", ")
    );
    let metadata = [
        (CLASS_NAMES_METADATA, class_names.join("\n")),
        (PROVENANCE_METADATA, model.meta().to_string()),
    ];
    Ok((encode(&net, &description, &metadata), report))
}

/// A `u8` whose vectors start 16-byte aligned: the schema's `force_align:
/// 16` on `Buffer.data`, which the Rust builder does not apply by itself.
struct Align16;

impl Push for Align16 {
    type Output = u8;
    unsafe fn push(&self, _dst: &mut [u8], _written_len: usize) {}
    fn alignment() -> PushAlignment {
        PushAlignment::new(16)
    }
}

/// `data` as a 16-byte aligned `[ubyte]` vector.
fn aligned_bytes<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    data: &[u8],
) -> WIPOffset<flatbuffers::Vector<'a, u8>> {
    fbb.start_vector::<Align16>(data.len());
    // A flatbuffer is built back to front.
    for &b in data.iter().rev() {
        fbb.push(b);
    }
    fbb.end_vector::<u8>(data.len())
}

/// The flatbuffer of `net`, with `description` and `metadata` entries
/// (name, UTF-8 text).
pub fn encode(net: &Net, description: &str, metadata: &[(&str, String)]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(1 << 20);
    let mut buffers: Vec<&[u8]> = net.buffers.iter().map(Vec::as_slice).collect();
    let first_meta_buffer = buffers.len();
    buffers.extend(metadata.iter().map(|(_, text)| text.as_bytes()));
    let buffers: Vec<_> = buffers
        .iter()
        .map(|data| {
            let data = (!data.is_empty()).then(|| aligned_bytes(&mut fbb, data));
            fb::Buffer::create(
                &mut fbb,
                &fb::BufferArgs {
                    data,
                    ..Default::default()
                },
            )
        })
        .collect();
    let buffers = fbb.create_vector(&buffers);
    let (codes, code_of) = operator_codes(&mut fbb, &net.ops);
    let subgraph = subgraph(&mut fbb, net, &code_of);
    let metadata: Vec<_> = metadata
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let name = Some(fbb.create_string(name));
            let buffer = (first_meta_buffer + i) as u32;
            fb::Metadata::create(&mut fbb, &fb::MetadataArgs { name, buffer })
        })
        .collect();
    let args = fb::ModelArgs {
        version: 3,
        operator_codes: Some(codes),
        subgraphs: Some(fbb.create_vector(&[subgraph])),
        description: Some(fbb.create_string(description)),
        buffers: Some(buffers),
        metadata: Some(fbb.create_vector(&metadata)),
        ..Default::default()
    };
    let root = fb::Model::create(&mut fbb, &args);
    fb::finish_model_buffer(&mut fbb, root);
    fbb.finished_data().to_vec()
}

/// The op-code table (one entry per distinct op, in order of first use)
/// and each op's index into it.
fn operator_codes<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    ops: &[OpSpec],
) -> (
    WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::OperatorCode<'a>>>>,
    Vec<u32>,
) {
    let mut distinct: Vec<fb::BuiltinOperator> = Vec::new();
    let code_of = ops
        .iter()
        .map(|op| match distinct.iter().position(|&c| c == op.code) {
            Some(i) => i as u32,
            None => {
                distinct.push(op.code);
                (distinct.len() - 1) as u32
            }
        })
        .collect();
    let codes: Vec<_> = distinct
        .iter()
        .map(|&code| {
            let args = fb::OperatorCodeArgs {
                // Below 127 (PLACEHOLDER_FOR_GREATER_OP_CODES) both fields agree.
                deprecated_builtin_code: code.0.min(127) as i8,
                custom_code: None,
                version: op_version(code),
                builtin_code: code,
            };
            fb::OperatorCode::create(fbb, &args)
        })
        .collect();
    (fbb.create_vector(&codes), code_of)
}

/// The op versions the TFLite converter gives these int8 ops (TFLM does not
/// check them).
fn op_version(code: fb::BuiltinOperator) -> i32 {
    match code {
        fb::BuiltinOperator::CONV_2D => 3,
        fb::BuiltinOperator::FULLY_CONNECTED => 4,
        _ => 2,
    }
}

fn subgraph<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    net: &Net,
    code_of: &[u32],
) -> WIPOffset<fb::SubGraph<'a>> {
    let tensors: Vec<_> = net.tensors.iter().map(|t| tensor(fbb, t)).collect();
    let tensors = fbb.create_vector(&tensors);
    let ops: Vec<_> = net
        .ops
        .iter()
        .zip(code_of)
        .map(|(op, &code)| operator(fbb, op, code))
        .collect();
    let args = fb::SubGraphArgs {
        tensors: Some(tensors),
        inputs: Some(fbb.create_vector(&[net.input])),
        outputs: Some(fbb.create_vector(&[net.output])),
        operators: Some(fbb.create_vector(&ops)),
        name: Some(fbb.create_string("main")),
        ..Default::default()
    };
    fb::SubGraph::create(fbb, &args)
}

fn tensor<'a>(fbb: &mut FlatBufferBuilder<'a>, t: &TensorSpec) -> WIPOffset<fb::Tensor<'a>> {
    let quantization = t.quant.as_ref().map(|q| quantization(fbb, q));
    let args = fb::TensorArgs {
        shape: Some(fbb.create_vector(&t.shape)),
        type_: t.ty,
        buffer: t.buffer,
        name: Some(fbb.create_string(&t.name)),
        quantization,
        ..Default::default()
    };
    fb::Tensor::create(fbb, &args)
}

fn quantization<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    q: &Quant,
) -> WIPOffset<fb::QuantizationParameters<'a>> {
    let args = fb::QuantizationParametersArgs {
        scale: Some(fbb.create_vector(&q.scale)),
        zero_point: Some(fbb.create_vector(&q.zero_point)),
        quantized_dimension: q.dim,
        ..Default::default()
    };
    fb::QuantizationParameters::create(fbb, &args)
}

fn operator<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    op: &OpSpec,
    code: u32,
) -> WIPOffset<fb::Operator<'a>> {
    let (options_type, options) = builtin_options(fbb, &op.options);
    let args = fb::OperatorArgs {
        opcode_index: code,
        inputs: Some(fbb.create_vector(&op.inputs)),
        outputs: Some(fbb.create_vector(&op.outputs)),
        builtin_options_type: options_type,
        builtin_options: Some(options),
        ..Default::default()
    };
    fb::Operator::create(fbb, &args)
}

fn builtin_options(
    fbb: &mut FlatBufferBuilder<'_>,
    o: &Options,
) -> (fb::BuiltinOptions, WIPOffset<UnionWIPOffset>) {
    use fb::BuiltinOptions as B;
    match *o {
        Options::Conv {
            padding,
            stride,
            act,
        } => {
            let args = fb::Conv2DOptionsArgs {
                padding,
                stride_h: stride.0,
                stride_w: stride.1,
                fused_activation_function: act,
                ..Default::default()
            };
            (
                B::Conv2DOptions,
                fb::Conv2DOptions::create(fbb, &args).as_union_value(),
            )
        }
        Options::Pool {
            padding,
            stride,
            filter,
        } => {
            let args = fb::Pool2DOptionsArgs {
                padding,
                stride_h: stride.0,
                stride_w: stride.1,
                filter_height: filter.0,
                filter_width: filter.1,
                fused_activation_function: fb::ActivationFunctionType::NONE,
            };
            (
                B::Pool2DOptions,
                fb::Pool2DOptions::create(fbb, &args).as_union_value(),
            )
        }
        Options::Add { act } => {
            let args = fb::AddOptionsArgs {
                fused_activation_function: act,
                ..Default::default()
            };
            (
                B::AddOptions,
                fb::AddOptions::create(fbb, &args).as_union_value(),
            )
        }
        Options::Fc { act } => {
            let args = fb::FullyConnectedOptionsArgs {
                fused_activation_function: act,
                ..Default::default()
            };
            (
                B::FullyConnectedOptions,
                fb::FullyConnectedOptions::create(fbb, &args).as_union_value(),
            )
        }
        Options::Pad => (
            B::PadOptions,
            fb::PadOptions::create(fbb, &fb::PadOptionsArgs {}).as_union_value(),
        ),
        Options::PadV2 => (
            B::PadV2Options,
            fb::PadV2Options::create(fbb, &fb::PadV2OptionsArgs {}).as_union_value(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use shared::kernels::Dims;
    use shared::model::LayerKind;

    use super::super::plan::tflm_multiplier;
    use super::super::read::{read, Summary};
    use super::*;
    use crate::blob::{build_blob, OwnedModel};
    use crate::quantize::{FLayer, FTensor, Graph, TensorQuant};

    /// Every op kind and padding case on a 32x32x3 input: 3x3 stride-1 conv
    /// (SAME), 3x3 stride-2 pad-1 max pool (PADV2 -128), 3x3 stride-2 conv
    /// (PAD), 1x1 stride-2 shortcut (VALID), ReLU add, global average pool,
    /// FC to 3 logits. Scales are not float32-exact, as calibration's are not.
    fn synthetic_blob() -> OwnedModel {
        let t = |h, w, c, same| FTensor {
            dims: Dims::new(h, w, c),
            same_quant_as: same,
        };
        let weights = |n: usize, k: usize| {
            (0..n)
                .map(|i| ((i * k) % 11) as f32 * 0.05 - 0.25)
                .collect::<Vec<f32>>()
        };
        let conv = |name: &str, io, cin: usize, cout: usize, k: usize, stride, relu| FLayer::Conv {
            name: name.into(),
            io,
            w: weights(cout * k * k * cin, 7),
            b: (0..cout).map(|c| c as f32 * 0.01 - 0.02).collect(),
            k,
            stride,
            relu,
        };
        let graph = Graph {
            tensors: vec![
                t(32, 32, 3, None),
                t(32, 32, 4, None),
                t(16, 16, 4, Some(1)),
                t(8, 8, 8, None),
                t(8, 8, 8, None),
                t(8, 8, 8, None),
                t(1, 1, 8, Some(5)),
                t(1, 1, 3, None),
            ],
            layers: vec![
                conv("stem", (0, 1), 3, 4, 3, 1, true),
                FLayer::MaxPool { io: (1, 2) },
                conv("down", (2, 3), 4, 8, 3, 2, true),
                conv("short", (2, 4), 4, 8, 1, 2, false),
                FLayer::Add {
                    name: "add".into(),
                    io: (3, 4, 5),
                },
                FLayer::Gap { io: (5, 6) },
                FLayer::Fc {
                    io: (6, 7),
                    w: weights(3 * 8, 3),
                    b: vec![0.1, -0.1, 0.0],
                },
            ],
        };
        let q: TensorQuant = vec![
            (1.0 / 128.0, 0),
            (0.0234567, -100),
            (0.0234567, -100),
            (0.0312345, -128),
            (0.0456789, 7),
            (0.0398765, -90),
            (0.0398765, -90),
            (0.0876543, -3),
        ];
        let classes = names(&["cat", "dog", "owl"]);
        OwnedModel::new(&build_blob(&graph, &q, "model=synthetic\n", &classes).unwrap()).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Each conv/FC filter of `file` (per-channel, dimension 0, zero
    /// points 0) makes TFLM derive exactly the blob layer's multipliers and
    /// shifts; each activation keeps the blob tensor's scale and zero point.
    fn assert_quantization_matches(model: &Model<'_>, file: &Summary) {
        for i in 0..model.tensor_count() {
            let (ours, theirs) = (model.tensor(i).unwrap(), &file.tensors[usize::from(i)]);
            assert_eq!(
                (theirs.scale.as_slice(), theirs.zero_point.as_slice()),
                (&[ours.scale][..], &[i64::from(ours.zero_point)][..])
            );
        }
        let weighted: Vec<_> = file
            .ops
            .iter()
            .filter(|o| matches!(o.code.as_str(), "CONV_2D" | "FULLY_CONNECTED"))
            .collect();
        let layers: Vec<_> = model
            .layers()
            .filter(|l| matches!(l.kind, LayerKind::Conv(_) | LayerKind::FullyConnected(_)))
            .collect();
        assert_eq!(weighted.len(), layers.len());
        for (op, layer) in weighted.iter().zip(&layers) {
            let requant = match &layer.kind {
                LayerKind::Conv(c) => c.requant,
                LayerKind::FullyConnected(f) => f.requant,
                _ => unreachable!(),
            };
            let filter = &file.tensors[op.inputs[1] as usize];
            let bias = &file.tensors[op.inputs[2] as usize];
            assert!(filter.constant && bias.constant, "{}", layer.name);
            assert_eq!((filter.ty.as_str(), bias.ty.as_str()), ("INT8", "INT32"));
            assert_eq!(filter.quantized_dimension, 0);
            assert_eq!(filter.shape[0] as usize, requant.multiplier.len());
            assert!(filter.zero_point.iter().all(|&z| z == 0));
            let (s_in, s_out) = (
                model.tensor(layer.input).unwrap().scale,
                model.tensor(layer.output).unwrap().scale,
            );
            for (c, &fs) in filter.scale.iter().enumerate() {
                let derived = tflm_multiplier(s_in, fs, s_out);
                assert_eq!(
                    derived,
                    (requant.multiplier[c], requant.shift[c]),
                    "{} channel {c}",
                    layer.name
                );
            }
        }
    }

    #[test]
    fn synthetic_model_round_trips() {
        let blob = synthetic_blob();
        let model = blob.model().unwrap();
        let (bytes, report) = export_tflite(&model).unwrap();
        assert!(report.exact(), "{report:?}");
        let file = read(&bytes).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(
            file.op_names(),
            [
                "CONV_2D",
                "PADV2",
                "MAX_POOL_2D",
                "PAD",
                "CONV_2D",
                "CONV_2D",
                "ADD",
                "AVERAGE_POOL_2D",
                "FULLY_CONNECTED"
            ]
        );
        let window = |i: usize| file.ops[i].window.clone();
        assert_eq!(window(0), Some(("SAME".into(), 1, 1)));
        assert_eq!(window(2), Some(("VALID".into(), 2, 2)));
        assert_eq!(window(4), Some(("VALID".into(), 2, 2)));
        assert_eq!(window(5), Some(("VALID".into(), 2, 2)));
        let acts: Vec<_> = file
            .ops
            .iter()
            .filter_map(|o| o.activation.as_deref())
            .collect();
        // A ReLU onto zero point -128 clamps nothing: "down" has no activation.
        assert_eq!(acts, ["RELU", "NONE", "NONE", "RELU", "NONE"]);
        // The padded inputs: 32x32 → 34x34 before the pool, 16x16 → 18x18 before the conv.
        assert_eq!(
            file.tensors[file.ops[2].inputs[0] as usize].shape,
            [1, 34, 34, 4]
        );
        assert_eq!(
            file.tensors[file.ops[4].inputs[0] as usize].shape,
            [1, 18, 18, 4]
        );
        assert_eq!(file.tensors[file.inputs[0] as usize].shape, [1, 32, 32, 3]);
        assert_eq!(file.tensors[file.inputs[0] as usize].scale, [1.0 / 128.0]);
        assert_eq!(file.tensors[file.outputs[0] as usize].shape, [1, 3]);
        assert_quantization_matches(&model, &file);
        assert_eq!(file.metadata(CLASS_NAMES_METADATA), Some("cat\ndog\nowl"));
        assert_eq!(
            file.metadata(PROVENANCE_METADATA),
            Some("model=synthetic\n")
        );
        assert!(
            file.description.ends_with("classes: cat, dog, owl"),
            "{}",
            file.description
        );
        // Deterministic, and every constant buffer 16-byte aligned.
        assert_eq!(export_tflite(&model).unwrap().0, bytes);
        let buffers = fb::root_as_model(&bytes).unwrap().buffers().unwrap();
        for data in buffers.iter().filter_map(|b| b.data()) {
            assert_eq!(
                (data.bytes().as_ptr() as usize - bytes.as_ptr() as usize) % 16,
                0
            );
        }
    }

    /// The committed model: 59 ops, and TFLM derives every one of its
    /// multipliers, shifts and ADD parameters exactly (what makes
    /// `tflite-check` report 0 differing images).
    #[test]
    fn shipped_model_exports_exactly() {
        let blob = OwnedModel::new(&shared::model::BLOB.0).unwrap();
        let model = blob.model().unwrap();
        let (bytes, report) = export_tflite(&model).unwrap();
        assert!(report.exact(), "{}", report.warning().unwrap_or_default());
        let file = read(&bytes).unwrap();
        let count = |op: &str| file.op_names().iter().filter(|&&o| o == op).count();
        assert_eq!(
            [
                count("CONV_2D"),
                count("ADD"),
                count("PAD"),
                count("PADV2"),
                count("MAX_POOL_2D"),
                count("AVERAGE_POOL_2D"),
                count("FULLY_CONNECTED")
            ],
            [36, 16, 3, 1, 1, 1, 1]
        );
        assert_eq!(file.tensors[file.inputs[0] as usize].shape, [1, 32, 32, 3]);
        assert_eq!(file.tensors[file.outputs[0] as usize].shape, [1, 10]);
        assert_quantization_matches(&model, &file);
        assert!(file
            .metadata(CLASS_NAMES_METADATA)
            .unwrap()
            .starts_with("airplane\nautomobile\n"));
    }

    #[test]
    fn rejects_what_is_not_tflite() {
        let err = format!("{:#}", read(b"MRN8 not a flatbuffer").unwrap_err());
        assert!(err.contains("TFL3"), "{err}");
        let blob = synthetic_blob();
        let (mut bytes, _) = export_tflite(&blob.model().unwrap()).unwrap();
        bytes.truncate(bytes.len() / 2);
        assert!(read(&bytes).is_err());
    }
}
