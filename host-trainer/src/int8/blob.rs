//! Writing the quantized graph as a model blob (the format of
//! `shared::model`): the data section of weights, biases and
//! requantization tables, the activation arena plan, the layer and tensor
//! records, and the check that `shared` parses what was written. Also
//! [`OwnedModel`], an aligned copy of a blob, and the provenance text.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use shared::kernels::{conv2d_s8_scratch_len, AddParams, Conv2dParams, PoolParams};
use shared::model::format::{
    self, class_name_field, class_name_ok, Header, LayerRecord, TensorRecord,
};
use shared::model::{
    Model, Op, CLASS_NAME_LEN, MAX_ARENA_LEN, MAX_CLASSES, MAX_LAYERS, MAX_SCRATCH_LEN,
    MAX_TENSORS, MIN_CLASSES, NAME_LEN,
};
use shared::quant::quantize_multiplier;

use super::quantize::{f32_exact, quantize_weights, FLayer, Graph, TensorQuant};

/// Data section under construction, 4-byte aligned arrays.
#[derive(Default)]
struct DataSection(Vec<u8>);

impl DataSection {
    fn align(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    /// Quantizes a conv/FC layer with `b.len()` output channels (weights
    /// per channel, bias at `s_in * s_w[c]`, multipliers `s_in * s_w[c] /
    /// s_out`), appends its tables and returns the record's data fields
    /// `[filter, filter_len, bias, multiplier, shift]`.
    fn channelwise(&mut self, w: &[f32], b: &[f32], s_in: f64, s_out: f64) -> [u32; 5] {
        let (wq, ws) = quantize_weights(w, b.len());
        let bias: Vec<i32> = b
            .iter()
            .zip(&ws)
            .map(|(&bc, &sw)| {
                (bc as f64 / (s_in * sw))
                    .round()
                    .clamp(i32::MIN as f64, i32::MAX as f64) as i32
            })
            .collect();
        let (mult, shift): (Vec<i32>, Vec<i32>) = ws
            .iter()
            .map(|&sw| quantize_multiplier(s_in * sw / s_out))
            .unzip();
        [
            self.i8s(&wq),
            wq.len() as u32,
            self.i32s(&bias),
            self.i32s(&mult),
            self.i32s(&shift),
        ]
    }

    fn i8s(&mut self, v: &[i8]) -> u32 {
        self.align();
        let at = self.0.len() as u32;
        self.0.extend(v.iter().map(|&x| x as u8));
        at
    }
    fn i32s(&mut self, v: &[i32]) -> u32 {
        self.align();
        let at = self.0.len() as u32;
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        at
    }
}

/// `record` named `name` (ASCII, at most [`NAME_LEN`] bytes).
fn named(record: LayerRecord, name: &str) -> Result<LayerRecord> {
    let name = format::name_field(name)
        .with_context(|| format!("layer name `{name}` is not ASCII of at most {NAME_LEN} bytes"))?;
    Ok(LayerRecord { name, ..record })
}

/// `record` with the data-section tables `[filter, filter_len, bias,
/// multiplier, shift]` of [`DataSection::channelwise`].
fn with_tables(record: LayerRecord, tables: [u32; 5]) -> LayerRecord {
    let [filter, filter_len, bias, multiplier, shift] = tables;
    LayerRecord {
        filter,
        filter_len,
        bias,
        multiplier,
        shift,
        ..record
    }
}

fn small(v: usize, what: &str) -> Result<u8> {
    u8::try_from(v).with_context(|| format!("{what} {v} does not fit the blob format"))
}

/// Arena offsets for `sizes` given each tensor's `[first, last]` layer
/// lifetime: largest first, each at the lowest 4-aligned offset that does
/// not overlap a placed tensor whose lifetime intersects its own.
pub fn plan_arena(sizes: &[usize], life: &[(usize, usize)]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut offset = vec![0usize; sizes.len()];
    let mut placed: Vec<usize> = Vec::new();
    for &t in &order {
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&p| life[p].0 <= life[t].1 && life[t].0 <= life[p].1)
            .map(|&p| (offset[p], offset[p] + sizes[p]))
            .collect();
        busy.sort();
        let mut at = 0;
        for (s, e) in busy {
            if at + sizes[t] <= s {
                break;
            }
            at = at.max(e.div_ceil(4) * 4);
        }
        offset[t] = at;
        placed.push(t);
    }
    let total = (0..sizes.len())
        .map(|t| offset[t] + sizes[t])
        .max()
        .unwrap_or(0);
    (offset, total.div_ceil(4) * 4)
}

/// Encodes the quantized graph as a model blob with provenance `meta`
/// (`key=value` lines) and the names of its classes (one per logit, in
/// label order). The scales of `q` are taken [`f32_exact`], as the blob
/// stores them.
pub fn build_blob(
    graph: &Graph,
    q: &TensorQuant,
    meta: &str,
    classes: &[String],
) -> Result<Vec<u8>> {
    let q: &TensorQuant = &q.iter().map(|&(s, z)| (f32_exact(s), z)).collect();
    let n_t = graph.tensors.len();
    // The reader's limits (`shared::model`), so every blob written parses.
    ensure!(
        n_t <= MAX_TENSORS,
        "{n_t} tensors: the blob format allows at most {MAX_TENSORS}"
    );
    ensure!(
        (1..=MAX_LAYERS).contains(&graph.layers.len()),
        "{} layers: the blob format allows 1 to {MAX_LAYERS}",
        graph.layers.len()
    );
    check_class_names(graph, classes)?;
    let life = tensor_lifetimes(graph)?;
    let sizes: Vec<usize> = graph.tensors.iter().map(|t| t.dims.len()).collect();
    let (offsets, arena) = plan_arena(&sizes, &life);

    let mut data = DataSection::default();
    let mut scratch = 0usize;
    let records = graph
        .layers
        .iter()
        .map(|l| layer_record(l, graph, q, &mut data, &mut scratch))
        .collect::<Result<Vec<_>>>()?;
    data.align();
    ensure!(
        arena <= MAX_ARENA_LEN,
        "the activation arena needs {arena} bytes, more than the {MAX_ARENA_LEN} the blob format allows"
    );
    ensure!(
        scratch <= MAX_SCRATCH_LEN,
        "the conv scratch needs {scratch} i16, more than the {MAX_SCRATCH_LEN} the blob format allows"
    );
    let mut blob = encode(
        graph,
        q,
        (meta, classes),
        &offsets,
        (arena, scratch),
        &records,
        &data,
    )?;
    format::seal(&mut blob);
    // Writer and reader agree: what is written here is what `parse` accepts.
    OwnedModel::new(&blob).context("the written blob fails shared's validation")?;
    Ok(blob)
}

/// Each tensor's lifetime `(written at, last read at)` in layer steps; the
/// input is alive from step 0 and the logits are read after the last layer.
fn tensor_lifetimes(graph: &Graph) -> Result<Vec<(usize, usize)>> {
    let n_t = graph.tensors.len();
    let mut life: Vec<(usize, usize)> = vec![(usize::MAX, 0); n_t];
    life[0] = (0, 0);
    let io_of = |l: &FLayer| -> (Vec<usize>, usize) {
        match l {
            FLayer::Conv { io, .. }
            | FLayer::MaxPool { io }
            | FLayer::Gap { io }
            | FLayer::Fc { io, .. } => (vec![io.0], io.1),
            FLayer::Add { io, .. } => (vec![io.0, io.1], io.2),
        }
    };
    for (i, l) in graph.layers.iter().enumerate() {
        let (ins, out) = io_of(l);
        for t in ins {
            life[t].1 = life[t].1.max(i);
        }
        life[out] = (i, i);
    }
    let last = graph.layers.len();
    life[n_t - 1].1 = last; // the logits are read after the last layer
    ensure!(
        life.iter().all(|l| l.0 != usize::MAX),
        "graph has a tensor nobody writes"
    );
    Ok(life)
}

/// The layer record of `l`; its tables go into `data`, and `scratch` grows
/// to what the layer's conv needs (`conv2d_s8_scratch_len`, as the reader
/// checks it).
fn layer_record(
    l: &FLayer,
    graph: &Graph,
    q: &TensorQuant,
    data: &mut DataSection,
    scratch: &mut usize,
) -> Result<LayerRecord> {
    match l {
        FLayer::Conv {
            name,
            io: (i, o),
            w,
            b,
            k,
            stride,
            relu,
        } => {
            let (sin, zin) = q[*i];
            let (sout, zout) = q[*o];
            let tables = data.channelwise(w, b, sin, sout);
            let params = Conv2dParams {
                kernel_h: *k,
                kernel_w: *k,
                stride_h: *stride,
                stride_w: *stride,
                pad_h: k / 2,
                pad_w: k / 2,
                input_offset: -zin,
                output_offset: zout,
                act_min: if *relu { zout as i8 } else { -128 },
                act_max: 127,
            };
            *scratch = (*scratch).max(conv2d_s8_scratch_len(&params, graph.tensors[*i].dims.c));
            named(with_tables(conv_record(&params, *i, *o)?, tables), name)
        }
        FLayer::MaxPool { io: (i, o) } => {
            let p = PoolParams::MAX_3X3_S2_P1;
            let window = [
                p.kernel_h, p.kernel_w, p.stride_h, p.stride_w, p.pad_h, p.pad_w,
            ];
            let r = LayerRecord {
                act_min: p.act_min,
                act_max: p.act_max,
                ..with_window(base(Op::MaxPool, *i, *o), window)?
            };
            named(r, "maxpool")
        }
        FLayer::Gap { io: (i, o) } => {
            let d = graph.tensors[*i].dims;
            let r = LayerRecord {
                kernel_h: small(d.h, "pool")?,
                kernel_w: small(d.w, "pool")?,
                stride_h: 1,
                stride_w: 1,
                ..base(Op::AvgPool, *i, *o)
            };
            named(r, "avgpool")
        }
        FLayer::Add {
            name,
            io: (a, b, o),
        } => {
            let p = AddParams::from_scales(q[*a], q[*b], q[*o], true);
            let r = LayerRecord {
                act_min: p.act_min,
                act_max: p.act_max,
                input2: *b as u16,
                bias: data.i32s(&p.to_array()),
                ..base(Op::Add, *a, *o)
            };
            named(r, name)
        }
        FLayer::Fc { io: (i, o), w, b } => {
            let (sin, zin) = q[*i];
            let (sout, zout) = q[*o];
            let tables = data.channelwise(w, b, sin, sout);
            let r = LayerRecord {
                input_offset: -zin,
                output_offset: zout,
                ..base(Op::FullyConnected, *i, *o)
            };
            named(with_tables(r, tables), "fc")
        }
    }
}

/// The record of an `op` layer from tensor `input` to tensor `output`,
/// the rest empty ([`LayerRecord::new`]).
fn base(op: Op, input: usize, output: usize) -> LayerRecord {
    LayerRecord {
        input: input as u16,
        output: output as u16,
        ..LayerRecord::new(op)
    }
}

/// The record of a conv with `params` from tensor `input` to `output`
/// (data tables and name still empty).
fn conv_record(params: &Conv2dParams, input: usize, output: usize) -> Result<LayerRecord> {
    let p = params;
    let window = [
        p.kernel_h, p.kernel_w, p.stride_h, p.stride_w, p.pad_h, p.pad_w,
    ];
    Ok(LayerRecord {
        act_min: params.act_min,
        act_max: params.act_max,
        input_offset: params.input_offset,
        output_offset: params.output_offset,
        ..with_window(base(Op::Conv, input, output), window)?
    })
}

/// `r` with a window's `[kernel_h, kernel_w, stride_h, stride_w, pad_h,
/// pad_w]`, each checked to fit its byte.
fn with_window(r: LayerRecord, window: [usize; 6]) -> Result<LayerRecord> {
    let [kh, kw, sh, sw, ph, pw] = window;
    Ok(LayerRecord {
        kernel_h: small(kh, "kernel")?,
        kernel_w: small(kw, "kernel")?,
        stride_h: small(sh, "stride")?,
        stride_w: small(sw, "stride")?,
        pad_h: small(ph, "padding")?,
        pad_w: small(pw, "padding")?,
        ..r
    })
}

/// One valid class name per logit, within the blob format's limits.
fn check_class_names(graph: &Graph, classes: &[String]) -> Result<()> {
    let logits = graph.tensors.last().map_or(0, |t| t.dims.len());
    ensure!(
        classes.len() == logits,
        "{} class names for a model with {logits} logits",
        classes.len()
    );
    ensure!(
        (MIN_CLASSES..=MAX_CLASSES).contains(&logits),
        "{logits} classes: the blob format allows {MIN_CLASSES} to {MAX_CLASSES}"
    );
    for (i, name) in classes.iter().enumerate() {
        ensure!(
            class_name_ok(name),
            "class {i} ({name:?}): a class name must be 1 to {CLASS_NAME_LEN} bytes of UTF-8 without control characters"
        );
    }
    Ok(())
}

/// Header (CRC left 0), meta, class names, tensor table, layer table and data section,
/// laid out by [`Header::layout`].
fn encode(
    graph: &Graph,
    q: &TensorQuant,
    (meta, classes): (&str, &[String]),
    offsets: &[usize],
    (arena, scratch): (usize, usize),
    records: &[LayerRecord],
    data: &DataSection,
) -> Result<Vec<u8>> {
    let n_t = graph.tensors.len();
    let header = Header {
        arena_len: arena as u32,
        scratch_len: scratch as u32,
        input: 0,
        output: (n_t - 1) as u16,
        ..Header::layout(
            meta.len(),
            classes.len() as u16,
            n_t as u16,
            records.len() as u16,
            data.0.len(),
        )
        .context("the blob would exceed 4 GiB")?
    };
    let mut blob = Vec::with_capacity(header.total_len as usize);
    blob.extend_from_slice(&header.encode());
    blob.extend_from_slice(meta.as_bytes());
    blob.resize(header.classes_at as usize, 0);
    for name in classes {
        // Checked by `check_class_names`.
        blob.extend_from_slice(&class_name_field(name).context("class name")?);
    }
    for (t, info) in graph.tensors.iter().enumerate() {
        let d = info.dims;
        let dims = [d.h, d.w, d.c].map(u16::try_from);
        let [Ok(h), Ok(w), Ok(c)] = dims else {
            bail!("tensor {t}: dimension too large ({d:?})");
        };
        let r = TensorRecord::new([h, w, c], offsets[t] as u32, q[t].0 as f32, q[t].1);
        blob.extend_from_slice(&r.encode());
    }
    for r in records {
        blob.extend_from_slice(&r.encode());
    }
    blob.extend_from_slice(&data.0);
    ensure!(
        blob.len() == header.total_len as usize,
        "internal error: blob layout"
    );
    Ok(blob)
}

/// Copies a blob into 4-byte aligned storage (a `Vec<u8>` promises no
/// alignment) and parses it.
#[derive(Debug, Clone)]
pub struct OwnedModel {
    words: Vec<u32>,
    len: usize,
}

impl OwnedModel {
    /// Takes `bytes`, which must be a valid blob.
    pub fn new(bytes: &[u8]) -> Result<Self> {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        let m = Self {
            words,
            len: bytes.len(),
        };
        m.model()?;
        Ok(m)
    }

    /// Reads and validates a `.bin` model file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading model {}", path.display()))?;
        Self::new(&bytes).with_context(|| format!("model {}", path.display()))
    }

    /// The blob bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u32, u8>(&self.words)[..self.len]
    }

    /// The parsed model.
    pub fn model(&self) -> Result<Model<'_>> {
        Ok(Model::parse(self.bytes())?)
    }
}

/// Renders provenance as `key=value` lines in the given order.
pub fn meta_text(pairs: &[(&str, String)]) -> String {
    let mut s = String::new();
    for (k, v) in pairs {
        let v = v.replace('\n', " ");
        let _ = writeln!(s, "{k}={v}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::FTensor;
    use shared::kernels::Dims;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("class {i}")).collect()
    }

    /// Input 32x32x3 → 1x1 conv to `width` channels → global average pool →
    /// FC to 10 logits.
    fn tiny_graph(width: usize) -> (Graph, TensorQuant) {
        let t = |h, w, c, same| FTensor {
            dims: Dims::new(h, w, c),
            same_quant_as: same,
        };
        let graph = Graph {
            tensors: vec![
                t(32, 32, 3, None),
                t(32, 32, width, None),
                t(1, 1, width, Some(1)),
                t(1, 1, 10, None),
            ],
            layers: vec![
                FLayer::Conv {
                    name: "conv".into(),
                    io: (0, 1),
                    w: (0..3 * width).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect(),
                    b: vec![0.01; width],
                    k: 1,
                    stride: 1,
                    relu: true,
                },
                FLayer::Gap { io: (1, 2) },
                FLayer::Fc {
                    io: (2, 3),
                    w: (0..10 * width)
                        .map(|i| (i % 5) as f32 * 0.2 - 0.4)
                        .collect(),
                    b: vec![0.0; 10],
                },
            ],
        };
        let q = vec![(1.0 / 128.0, 0), (0.02, -128), (0.02, -128), (0.05, 3)];
        (graph, q)
    }

    /// The writer refuses what the reader would refuse, with the limit in
    /// the message, and what it writes parses.
    #[test]
    fn writer_enforces_the_readers_limits() {
        let (g, q) = tiny_graph(8);
        let blob = build_blob(&g, &q, "model=tiny\n", &names(10)).unwrap();
        let owned = OwnedModel::new(&blob).unwrap();
        assert_eq!(owned.model().unwrap().layer_count(), 3);
        assert_eq!(owned.model().unwrap().class_name(9), Some("class 9"));

        // Class names: one per logit, each valid.
        let err = format!("{:#}", build_blob(&g, &q, "", &names(9)).unwrap_err());
        assert!(
            err.contains("9 class names for a model with 10 logits"),
            "{err}"
        );
        let mut bad = names(10);
        bad[4] = "line\nbreak".into();
        let err = format!("{:#}", build_blob(&g, &q, "", &bad).unwrap_err());
        assert!(err.contains("class 4"), "{err}");

        // 1024 channels at 32x32: a 1 MiB tensor beside the input.
        let (g, q) = tiny_graph(1024);
        let err = format!("{:#}", build_blob(&g, &q, "", &names(10)).unwrap_err());
        assert!(err.contains(&MAX_ARENA_LEN.to_string()), "{err}");

        let (mut g, mut q) = tiny_graph(8);
        while g.tensors.len() <= MAX_TENSORS {
            g.tensors.push(FTensor {
                dims: Dims::new(1, 1, 1),
                same_quant_as: None,
            });
            q.push((1.0, 0));
        }
        let err = format!("{:#}", build_blob(&g, &q, "", &names(10)).unwrap_err());
        assert!(err.contains(&format!("at most {MAX_TENSORS}")), "{err}");

        let (mut g, q) = tiny_graph(8);
        g.layers.clear();
        let err = format!("{:#}", build_blob(&g, &q, "", &names(10)).unwrap_err());
        assert!(err.contains(&format!("1 to {MAX_LAYERS}")), "{err}");
    }

    #[test]
    fn arena_plan_never_overlaps_live_tensors() {
        // A chain with a skip: 0 → 1 → 2, and 0 is read again at step 2.
        let sizes = [100, 50, 70, 10];
        let life = [(0, 2), (0, 1), (1, 2), (2, 3)];
        let (off, total) = plan_arena(&sizes, &life);
        for a in 0..4 {
            for b in 0..a {
                let live = life[a].0 <= life[b].1 && life[b].0 <= life[a].1;
                let overlap = off[a] < off[b] + sizes[b] && off[b] < off[a] + sizes[a];
                assert!(!(live && overlap), "{a} and {b} overlap");
            }
        }
        assert!(off.iter().all(|o| o % 4 == 0));
        // Not just under the sum of all sizes (true of any non-overlapping
        // packing): the plan reaches the peak of live bytes, step 1's
        // 100 + 50 + 70 (224 with 4-byte alignment), because tensor 3 reuses
        // tensor 1's bytes (their lifetimes never meet).
        assert_eq!(off, [0, 172, 100, 172]);
        assert_eq!(total, 224);
    }
}
