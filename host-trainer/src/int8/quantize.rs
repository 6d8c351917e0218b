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
//! 4. [`crate::blob`] plans the activation arena and writes the blob
//!    described in `shared::model`.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Module, Tensor, D};
use shared::kernels::Dims;
use shared::preprocess::INPUT_SCALE_RECIPROCAL;

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
pub(super) fn quantize_weights(w: &[f32], out_c: usize) -> (Vec<i8>, Vec<f64>) {
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
