//! Post-training int8 quantization and export of a trained Mini-ResNet.
//!
//! 1. **Trace** the float network (eval mode) into a flat graph of int8
//!    ops (conv, max pool, add, global average pool, FC) and the activation
//!    tensors between them, with BatchNorm folded into each conv:
//!    `w' = w * γ / sqrt(var + ε)`, `b' = β - mean * γ / sqrt(var + ε)`.
//! 2. **Calibrate** every activation tensor on training images (min/max or a
//!    percentile of the observed values) and choose its per-tensor scale and
//!    zero point. ReLU outputs start at 0, so their zero point is -128. The
//!    input is fixed by `shared::preprocess`: scale 1/128, zero point 0.
//!    Max pool and global average pool keep their input's quantization.
//! 3. **Quantize** weights per output channel, symmetric in `[-127, 127]`;
//!    biases to int32 at `input_scale * weight_scale[c]`; requantization
//!    multipliers with `shared::quant::quantize_multiplier`; residual adds
//!    with TFLM's ADD parameters (`AddParams::from_scales`).
//! 4. **Plan** the activation arena (greedy by size, lowest offset without
//!    overlapping any tensor alive at the same time) and **write** the
//!    blob described in `shared::model`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Module, Tensor, D};
use shared::kernels::{conv2d_s8_scratch_len, AddParams, Conv2dParams, Dims, PoolParams};
use shared::model::format::{
    self, class_name_field, class_name_ok, Header, LayerRecord, TensorRecord,
};
use shared::model::{
    Model, Op, CLASS_NAME_LEN, MAX_ARENA_LEN, MAX_CLASSES, MAX_LAYERS, MAX_SCRATCH_LEN,
    MAX_TENSORS, MIN_CLASSES, NAME_LEN,
};
use shared::preprocess::INPUT_SCALE_RECIPROCAL;
use shared::quant::quantize_multiplier;

use crate::augment::{write_chw, Aug};
use crate::data::Dataset;
use crate::model::{ConvBn, MiniResNet};

/// How activation ranges are chosen from calibration data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// The observed minimum and maximum.
    MinMax,
    /// The given percentile (e.g. 99.99) of the values above and below 0.
    Percentile(f64),
}

impl std::str::FromStr for Calibration {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "minmax" {
            return Ok(Calibration::MinMax);
        }
        if let Some(p) = s.strip_prefix("percentile:") {
            let p: f64 = p
                .parse()
                .with_context(|| format!("calibration `{s}`: bad percentile"))?;
            ensure!(
                (50.0..=100.0).contains(&p),
                "calibration `{s}`: percentile must be in 50..=100"
            );
            return Ok(Calibration::Percentile(p));
        }
        bail!("unknown calibration `{s}` (expected `minmax` or `percentile:P`, e.g. `percentile:99.99`)")
    }
}

impl std::fmt::Display for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Calibration::MinMax => write!(f, "minmax"),
            Calibration::Percentile(p) => write!(f, "percentile:{p}"),
        }
    }
}

/// A float activation tensor of the traced graph.
#[derive(Debug, Clone)]
pub struct FTensor {
    /// Shape (h, w, c).
    pub dims: Dims,
    /// The tensor whose quantization this one shares (pools), if any.
    pub same_quant_as: Option<usize>,
}

/// A float op of the traced graph, weights already BN-folded.
#[derive(Debug, Clone)]
pub enum FLayer {
    /// Convolution, weights OHWI.
    Conv {
        /// Name, e.g. `layer2.0.conv1`.
        name: String,
        /// Input / output tensor indices.
        io: (usize, usize),
        /// Folded weights, OHWI.
        w: Vec<f32>,
        /// Folded bias.
        b: Vec<f32>,
        /// Kernel size.
        k: usize,
        /// Stride.
        stride: usize,
        /// Fused ReLU.
        relu: bool,
    },
    /// 3x3 stride-2 pad-1 max pool.
    MaxPool {
        /// Input / output.
        io: (usize, usize),
    },
    /// Residual add with fused ReLU.
    Add {
        /// Name.
        name: String,
        /// Inputs and output.
        io: (usize, usize, usize),
    },
    /// Global average pool.
    Gap {
        /// Input / output.
        io: (usize, usize),
    },
    /// Fully connected, weights `[out][in]`.
    Fc {
        /// Input / output.
        io: (usize, usize),
        /// Weights.
        w: Vec<f32>,
        /// Bias.
        b: Vec<f32>,
    },
}

/// The traced float graph. Tensor 0 is the input.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Activation tensors.
    pub tensors: Vec<FTensor>,
    /// Ops in execution order.
    pub layers: Vec<FLayer>,
}

/// BN-folded OHWI weights and bias of a conv+BN pair.
fn fold(cb: &ConvBn) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let w = cb.conv.weight(); // (out, in, k, k)
    let (o, _i, k, _) = w.dims4()?;
    let (gamma, beta) = cb
        .bn
        .weight_and_bias()
        .context("batch norm without affine parameters")?;
    let mean: Vec<f32> = cb.bn.running_mean().to_vec1()?;
    let var: Vec<f32> = cb.bn.running_var().to_vec1()?;
    let gamma: Vec<f32> = gamma.to_vec1()?;
    let beta: Vec<f32> = beta.to_vec1()?;
    let eps = cb.bn.eps();
    let scale: Vec<f64> = (0..o)
        .map(|c| gamma[c] as f64 / (var[c] as f64 + eps).sqrt())
        .collect();
    let ohwi: Vec<f32> = w.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1()?;
    let per = ohwi.len() / o;
    let wf = ohwi
        .iter()
        .enumerate()
        .map(|(j, &v)| (v as f64 * scale[j / per]) as f32)
        .collect();
    let bf = (0..o)
        .map(|c| (beta[c] as f64 - mean[c] as f64 * scale[c]) as f32)
        .collect();
    Ok((wf, bf, k))
}

/// Traces `model` on `x` `(N, 3, 32, 32)` in eval mode. Returns the graph
/// and every tensor's activations as `(N, C, H, W)` (or `(N, C)`) tensors in
/// graph order.
pub fn trace(model: &MiniResNet, x: &Tensor) -> Result<(Graph, Vec<Tensor>)> {
    let mut g = Graph::default();
    let mut acts = Vec::new();
    let push =
        |g: &mut Graph, acts: &mut Vec<Tensor>, t: Tensor, same: Option<usize>| -> Result<usize> {
            let dims = match t.dims() {
                [_, c, h, w] => Dims::new(*h, *w, *c),
                [_, c] => Dims::new(1, 1, *c),
                d => bail!("unexpected activation shape {d:?}"),
            };
            g.tensors.push(FTensor {
                dims,
                same_quant_as: same,
            });
            acts.push(t);
            Ok(g.tensors.len() - 1)
        };
    let conv = |g: &mut Graph,
                acts: &mut Vec<Tensor>,
                name: &str,
                cb: &ConvBn,
                input: usize,
                relu: bool|
     -> Result<usize> {
        let mut y = cb.forward_eval(&acts[input])?;
        if relu {
            y = y.relu()?;
        }
        let out = push(g, acts, y, None)?;
        let (w, b, k) = fold(cb)?;
        let stride = cb.conv.config().stride;
        g.layers.push(FLayer::Conv {
            name: name.to_string(),
            io: (input, out),
            w,
            b,
            k,
            stride,
            relu,
        });
        Ok(out)
    };
    let mut cur = push(&mut g, &mut acts, x.clone(), None)?;
    cur = conv(&mut g, &mut acts, "stem.conv", &model.stem, cur, true)?;
    if model.arch.maxpool {
        let y = crate::model::maxpool_3x3_s2_p1(&acts[cur])?;
        let out = push(&mut g, &mut acts, y, Some(cur))?;
        g.layers.push(FLayer::MaxPool { io: (cur, out) });
        cur = out;
    }
    for (s, stage) in model.stages.iter().enumerate() {
        for (bi, block) in stage.iter().enumerate() {
            let name = format!("layer{}.{bi}", s + 1);
            let c1 = conv(
                &mut g,
                &mut acts,
                &format!("{name}.conv1"),
                &block.c1,
                cur,
                true,
            )?;
            let c2 = conv(
                &mut g,
                &mut acts,
                &format!("{name}.conv2"),
                &block.c2,
                c1,
                false,
            )?;
            let sc = match &block.shortcut {
                Some(sc) => conv(&mut g, &mut acts, &format!("{name}.short"), sc, cur, false)?,
                None => cur,
            };
            let y = (&acts[c2] + &acts[sc])?.relu()?;
            let out = push(&mut g, &mut acts, y, None)?;
            g.layers.push(FLayer::Add {
                name: format!("{name}.add"),
                io: (c2, sc, out),
            });
            cur = out;
        }
    }
    let pooled = acts[cur].mean(D::Minus1)?.mean(D::Minus1)?;
    let gap = push(&mut g, &mut acts, pooled, Some(cur))?;
    g.layers.push(FLayer::Gap { io: (cur, gap) });
    let logits = model.fc.forward(&acts[gap])?;
    let out = push(&mut g, &mut acts, logits, None)?;
    let w: Vec<f32> = model.fc.weight().flatten_all()?.to_vec1()?;
    let b: Vec<f32> = model.fc.bias().context("fc without bias")?.to_vec1()?;
    g.layers.push(FLayer::Fc {
        io: (gap, out),
        w,
        b,
    });
    Ok((g, acts))
}

/// `(scale, zero_point)` of each tensor.
pub type TensorQuant = Vec<(f64, i32)>;

/// Asymmetric int8 quantization covering `[min, max]` (which is widened to
/// include 0 so that 0 is exact).
pub fn choose_quant(min: f64, max: f64) -> (f64, i32) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let range = (max - min).max(1e-8);
    let scale = range / 255.0;
    let zp = (-128.0 - min / scale).round().clamp(-128.0, 127.0) as i32;
    (scale, zp)
}

/// Runs `calib` images through the traced graph and picks every tensor's
/// quantization.
pub fn calibrate(
    model: &MiniResNet,
    calib: &Dataset,
    method: Calibration,
    batch: usize,
) -> Result<(Graph, TensorQuant, Vec<Vec<f64>>)> {
    ensure!(!calib.is_empty(), "no calibration images");
    let device = model.fc.weight().device().clone();
    let mut graph = None;
    let mut lo: Vec<f64> = Vec::new();
    let mut hi: Vec<f64> = Vec::new();
    let mut samples: Vec<Vec<f32>> = Vec::new();
    let mut sums: Vec<(Vec<f64>, usize)> = Vec::new();
    let idx: Vec<usize> = (0..calib.len()).collect();
    for chunk in idx.chunks(batch) {
        let (x, _) = crate::augment::batch(calib, chunk, None, &device)?;
        let (g, acts) = trace(model, &x)?;
        if graph.is_none() {
            lo = vec![f64::INFINITY; acts.len()];
            hi = vec![f64::NEG_INFINITY; acts.len()];
            samples = vec![Vec::new(); acts.len()];
            sums = vec![(Vec::new(), 0); acts.len()];
            graph = Some(g);
        }
        for (t, a) in acts.iter().enumerate() {
            let per_channel = match a.rank() {
                4 => a.sum((0, 2, 3))?,
                _ => a.sum(0)?,
            };
            let v: Vec<f32> = per_channel.to_vec1()?;
            let (sum, count) = &mut sums[t];
            sum.resize(v.len(), 0.0);
            sum.iter_mut()
                .zip(&v)
                .for_each(|(s, &x)| *s += f64::from(x));
            *count += a.elem_count() / v.len().max(1);
            let v: Vec<f32> = a.flatten_all()?.to_vec1()?;
            for &x in &v {
                lo[t] = lo[t].min(x as f64);
                hi[t] = hi[t].max(x as f64);
            }
            if let Calibration::Percentile(_) = method {
                let stride = (v.len() / (512 * chunk.len())).max(1);
                samples[t].extend(v.iter().step_by(stride));
            }
        }
    }
    let graph = graph.context("no calibration batch")?;
    let mut q: TensorQuant = Vec::with_capacity(graph.tensors.len());
    for (t, info) in graph.tensors.iter().enumerate() {
        let chosen = if t == 0 {
            // Fixed by shared::preprocess: `real = q / 128`, zero point 0.
            (1.0 / f64::from(INPUT_SCALE_RECIPROCAL), 0)
        } else if let Some(src) = info.same_quant_as {
            q[src]
        } else {
            match method {
                Calibration::MinMax => choose_quant(lo[t], hi[t]),
                Calibration::Percentile(p) => {
                    let s = &mut samples[t];
                    s.sort_by(|a, b| a.total_cmp(b));
                    let at =
                        |f: f64| s[((f / 100.0) * (s.len() - 1) as f64).round() as usize] as f64;
                    choose_quant(at(100.0 - p).max(lo[t]), at(p).min(hi[t]))
                }
            }
        };
        q.push(chosen);
    }
    let means = sums
        .into_iter()
        .map(|(s, n)| s.into_iter().map(|x| x / n.max(1) as f64).collect())
        .collect();
    Ok((graph, q, means))
}

/// Bias correction for weight quantization: each conv and FC bias minus
/// the mean output error its int8 weights make, `ε[o] = Σ (ŵ − w)[o][…][c]
/// · μ[c]`, with `μ` the input's per-channel mean on the calibration
/// images (`means`, from [`calibrate`]; border padding ignored).
pub fn correct_biases(graph: &mut Graph, means: &[Vec<f64>]) {
    for l in &mut graph.layers {
        let (input, w, b) = match l {
            FLayer::Conv { io, w, b, .. } => (io.0, &*w, b),
            FLayer::Fc { io, w, b } => (io.0, &*w, b),
            _ => continue,
        };
        let mu = &means[input];
        let (wq, ws) = quantize_weights(w, b.len());
        let per = w.len() / b.len();
        for (o, bo) in b.iter_mut().enumerate() {
            let eps: f64 = (0..per)
                .map(|j| {
                    let i = o * per + j;
                    (f64::from(wq[i]) * ws[o] - f64::from(w[i])) * mu[j % mu.len()]
                })
                .sum();
            *bo = (f64::from(*bo) - eps) as f32;
        }
    }
}

/// `scale` rounded to the `f32` that the blob and a `.tflite` file store.
/// Every multiplier is derived from these rounded scales, in `f64`, as
/// TFLM's `Prepare` derives it from the `f32` scales of a `.tflite` file,
/// so that TFLM computes exactly the blob's multipliers and shifts.
pub fn f32_exact(scale: f64) -> f64 {
    f64::from(scale as f32)
}

/// Symmetric per-output-channel int8 weights: `(q, scales)`, the scales
/// [`f32_exact`].
fn quantize_weights(w: &[f32], out_c: usize) -> (Vec<i8>, Vec<f64>) {
    let per = w.len() / out_c;
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(out_c);
    for row in w.chunks(per) {
        let max = row.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let s = f32_exact(if max > 0.0 { max / 127.0 } else { 1.0 });
        scales.push(s);
        q.extend(
            row.iter()
                .map(|&v| (v as f64 / s).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (q, scales)
}

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

/// The int8 network input of a 32x32 HWC image, through exactly the
/// firmware's path: an RGB888 frame into `shared::preprocess`.
pub fn int8_input(img: &[u8]) -> Result<[i8; shared::preprocess::INPUT_LEN]> {
    let mut out = [0i8; shared::preprocess::INPUT_LEN];
    shared::preprocess::preprocess(
        &shared::preprocess::Frame {
            data: img,
            width: 32,
            height: 32,
            format: shared::preprocess::PixelFormat::Rgb888,
        },
        &mut out,
    )
    .context("preprocessing a 32x32 image")?;
    Ok(out)
}

/// The float input `(p - 128) / 128` of an image, CHW (for tests).
pub fn float_input(img: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; 3 * 32 * 32];
    write_chw(img, Aug::NONE, &mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An FC layer fed its calibration means: with the corrected bias, the
    /// int8 weights (dequantized) give the float output; without it they
    /// do not. A conv's correction uses each input channel's mean at every
    /// tap.
    #[test]
    fn bias_correction_cancels_the_weight_error_at_the_mean_input() {
        let (out_c, in_c) = (3, 5);
        let w: Vec<f32> = (0..out_c * in_c)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.0123 + 0.001)
            .collect();
        let b = vec![0.1f32, -0.2, 0.3];
        let mu: Vec<f64> = (0..in_c).map(|c| 0.5 + c as f64 * 0.25).collect();
        let fc = FLayer::Fc {
            io: (0, 1),
            w: w.clone(),
            b: b.clone(),
        };
        let mut g = Graph {
            tensors: Vec::new(),
            layers: vec![fc.clone()],
        };
        correct_biases(&mut g, &[mu.clone(), vec![0.0; out_c]]);
        let FLayer::Fc { b: corrected, .. } = &g.layers[0] else {
            unreachable!()
        };
        let (wq, ws) = quantize_weights(&w, out_c);
        for o in 0..out_c {
            let dot = |f: &dyn Fn(usize) -> f64| (0..in_c).map(|c| f(c) * mu[c]).sum::<f64>();
            let float = dot(&|c| f64::from(w[o * in_c + c])) + f64::from(b[o]);
            let int8 = dot(&|c| f64::from(wq[o * in_c + c]) * ws[o]);
            assert!(
                (int8 + f64::from(corrected[o]) - float).abs() < 1e-6,
                "channel {o}"
            );
            assert!(
                (int8 + f64::from(b[o]) - float).abs() > 1e-5,
                "channel {o}: no error to correct"
            );
        }
        // A 3x3 conv (OHWI) with one input channel: the same sum over taps.
        let conv = FLayer::Conv {
            name: "c".into(),
            io: (0, 1),
            w: w[..9].to_vec(),
            b: vec![0.0],
            k: 3,
            stride: 1,
            relu: false,
        };
        let mut g = Graph {
            tensors: Vec::new(),
            layers: vec![conv],
        };
        correct_biases(&mut g, &[vec![2.0], vec![0.0]]);
        let FLayer::Conv { b: corrected, .. } = &g.layers[0] else {
            unreachable!()
        };
        let (wq, ws) = quantize_weights(&w[..9], 1);
        let err: f64 = (0..9)
            .map(|i| (f64::from(wq[i]) * ws[0] - f64::from(w[i])) * 2.0)
            .sum();
        assert!((f64::from(corrected[0]) + err).abs() < 1e-7);
    }

    #[test]
    fn choose_quant_covers_range_and_zero() {
        let (s, z) = choose_quant(0.0, 6.0);
        assert_eq!(z, -128);
        assert!((s - 6.0 / 255.0).abs() < 1e-12);
        let (s, z) = choose_quant(-1.0, 1.0);
        assert!((s - 2.0 / 255.0).abs() < 1e-12);
        assert_eq!(z, -1); // -128 + 1 / (2/255) = -0.5, rounded half away from zero
        let (_, z) = choose_quant(0.5, 2.0); // widened to include 0
        assert_eq!(z, -128);
    }

    #[test]
    fn weights_are_symmetric_per_channel() {
        let (q, s) = quantize_weights(&[0.5, -1.0, 0.25, 0.0, 2.0, -2.0, 1.0, 0.0], 2);
        assert_eq!(q, vec![64, -127, 32, 0, 127, -127, 64, 0]);
        assert!((s[0] - 1.0 / 127.0).abs() < 1e-9 && (s[1] - 2.0 / 127.0).abs() < 1e-9);
        assert!(s.iter().all(|&x| f32_exact(x) == x));
        let (q, s) = quantize_weights(&[0.0, 0.0], 1);
        assert_eq!((q, s), (vec![0, 0], vec![1.0]));
    }

    /// `n` class names.
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

    #[test]
    fn calibration_parses() {
        assert_eq!(
            "minmax".parse::<Calibration>().unwrap(),
            Calibration::MinMax
        );
        assert_eq!(
            "percentile:99.9".parse::<Calibration>().unwrap(),
            Calibration::Percentile(99.9)
        );
        assert!("percentile:5".parse::<Calibration>().is_err());
        assert!("kl".parse::<Calibration>().is_err());
    }
}
