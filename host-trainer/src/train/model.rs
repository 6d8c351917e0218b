//! Mini-ResNet in candle: ResNet-34's basic blocks with a 3x3 stride-1 stem
//! and every width divided by 4.
//!
//! ```text
//! stem:   conv3x3(3→16, s1, p1) → BN → ReLU → [maxpool 3x3 s2 p1]
//! stages: basic blocks [3,4,6,3] at widths 16/32/64/128; the first block of
//!         stages 2–4 has stride 2 and a 1x1 stride-2 conv + BN shortcut
//! head:   global average pool → FC 128→10
//! ```
//!
//! The input is NCHW f32 (the stock ops keep that layout; the fast CPU ops turn
//! it into NHWC once at the stem). The input is `(pixel - 128) / 128`, the float
//! twin of `shared::preprocess` (scale 1/128, zero point 0).
//!
//! Variable names (checkpoints and the exporter rely on them):
//! `stem.conv.weight`, `stem.bn.{weight,bias,running_mean,running_var}`,
//! `layer{S}.{B}.conv{1,2}.weight`, `layer{S}.{B}.bn{1,2}.*`,
//! `layer{S}.{B}.shortcut.conv.weight`, `layer{S}.{B}.shortcut.bn.*`,
//! `fc.weight`, `fc.bias`.

use anyhow::{ensure, Result};
use candle_core::{Module, ModuleT, Tensor, D};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops;

/// Architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchConfig {
    /// Channels of each stage.
    pub widths: Vec<usize>,
    /// Basic blocks in each stage.
    pub blocks: Vec<usize>,
    /// 3x3 stride-2 max pool after the stem (the seed model has it).
    pub maxpool: bool,
    /// Number of classes.
    pub classes: usize,
}

impl ArchConfig {
    /// The seed article's Mini-ResNet: 1,334,618 parameters, 18.53 M MACs.
    pub fn seed() -> Self {
        Self {
            widths: vec![16, 32, 64, 128],
            blocks: vec![3, 4, 6, 3],
            maxpool: true,
            classes: 10,
        }
    }

    /// The seed model without the stem max pool (72.8 M MACs).
    pub fn no_maxpool() -> Self {
        Self {
            maxpool: false,
            ..Self::seed()
        }
    }

    /// Checks the configuration is buildable.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.widths.is_empty(), "arch: `widths` is empty");
        ensure!(
            self.widths.len() == self.blocks.len(),
            "arch: {} widths but {} stage block counts",
            self.widths.len(),
            self.blocks.len()
        );
        ensure!(
            self.widths.iter().all(|&w| w > 0) && self.blocks.iter().all(|&b| b > 0),
            "arch: widths and block counts must be positive"
        );
        ensure!(self.classes > 0, "arch: `classes` must be positive");
        Ok(())
    }

    /// Trainable parameters (conv and FC weights, FC bias, BN scale and shift).
    pub fn parameters(&self) -> usize {
        self.layers().iter().map(|l| l.params()).sum()
    }

    /// Multiply-accumulates per 32x32 image (convs and FC).
    pub fn macs(&self) -> usize {
        self.layers().iter().map(|l| l.macs).sum()
    }

    /// The weight layers in execution order, with their shapes.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let mut out = Vec::new();
        let stem_w = self.widths[0];
        out.push(LayerInfo::conv("stem.conv", 3, stem_w, 3, 32));
        let mut hw: usize = if self.maxpool { 16 } else { 32 };
        let mut cin = stem_w;
        for (s, (&width, &blocks)) in self.widths.iter().zip(&self.blocks).enumerate() {
            for b in 0..blocks {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let ho = hw.div_ceil(stride);
                let name = format!("layer{}.{b}", s + 1);
                out.push(LayerInfo::conv(&format!("{name}.conv1"), cin, width, 3, ho));
                out.push(LayerInfo::conv(
                    &format!("{name}.conv2"),
                    width,
                    width,
                    3,
                    ho,
                ));
                if stride != 1 || cin != width {
                    out.push(LayerInfo::conv(
                        &format!("{name}.shortcut.conv"),
                        cin,
                        width,
                        1,
                        ho,
                    ));
                }
                cin = width;
                hw = ho;
            }
        }
        out.push(LayerInfo {
            name: "fc".into(),
            weights: cin * self.classes,
            bias: self.classes,
            macs: cin * self.classes,
        });
        out
    }
}

/// Size of one weight layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Variable prefix.
    pub name: String,
    /// Weight count.
    pub weights: usize,
    /// Bias or BN scale+shift count.
    pub bias: usize,
    /// MACs per image.
    pub macs: usize,
}

impl LayerInfo {
    fn conv(name: &str, cin: usize, cout: usize, k: usize, out_hw: usize) -> Self {
        Self {
            name: name.into(),
            weights: cin * cout * k * k,
            bias: 2 * cout, // BN weight + bias
            macs: out_hw * out_hw * cout * cin * k * k,
        }
    }

    fn params(&self) -> usize {
        self.weights + self.bias
    }
}

/// Conv (no bias) followed by BatchNorm.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// The convolution.
    pub conv: Conv2d,
    /// Its batch norm.
    pub bn: BatchNorm,
}

impl ConvBn {
    fn new(
        vb: VarBuilder,
        conv_name: &str,
        bn_name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        let conv = candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb.pp(conv_name))?;
        let bn = candle_nn::batch_norm(cout, 1e-5, vb.pp(bn_name))?;
        Ok(Self { conv, bn })
    }

    /// Conv then BN (batch statistics when `train`, running ones otherwise),
    /// with stock candle ops (any device).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, train)
    }

    /// Inference: conv then BN with running statistics (stock candle ops).
    pub fn forward_eval(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Conv, BN and optionally ReLU with the given backend. The fast
    /// backend updates the BN running statistics exactly as candle-nn's
    /// `BatchNorm` does (momentum 0.1, unbiased batch variance).
    pub fn forward_with(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        backend: Backend,
    ) -> candle_core::Result<Tensor> {
        if backend == Backend::Stock {
            let y = self.forward_t(x, train)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let cfg = self.conv.config();
        let (w, stride, pad) = (self.conv.weight(), cfg.stride, cfg.padding);
        let Some((gamma, beta)) = self.bn.weight_and_bias() else {
            candle_core::bail!("batch norm without scale and shift")
        };
        let eps = self.bn.eps();
        if train {
            let (y, st) = ops::conv_bn_train(x, w, gamma, beta, stride, pad, eps, relu)?;
            self.update_running(&st)?;
            Ok(y)
        } else {
            let (a, b) = self.folded_bn()?;
            ops::conv_affine_eval(x, w, &a, &b, stride, pad, relu)
        }
    }

    /// Updates the BN running statistics from a batch's, exactly as
    /// candle-nn's `BatchNorm` does (momentum 0.1, unbiased batch variance).
    fn update_running(&self, st: &ops::BnStats) -> candle_core::Result<()> {
        let m = BN_MOMENTUM as f32;
        let unbias = st.count as f32 / (st.count.max(2) - 1) as f32;
        let update = |running: &Tensor, batch: &[f32], k: f32| -> candle_core::Result<()> {
            let old: Vec<f32> = running.to_vec1()?;
            let new: Vec<f32> = old
                .iter()
                .zip(batch)
                .map(|(&r, &b)| r * (1.0 - m) + b * k * m)
                .collect();
            candle_core::Var::from_tensor(running)?.set(&Tensor::from_vec(
                new,
                running.dims(),
                running.device(),
            )?)
        };
        update(self.bn.running_mean(), &st.mean, 1.0)?;
        update(self.bn.running_var(), &st.var, unbias)
    }

    /// BN with running statistics as a per-channel (scale, shift).
    fn folded_bn(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let Some((gamma, beta)) = self.bn.weight_and_bias() else {
            candle_core::bail!("batch norm without scale and shift")
        };
        let a = gamma.div(&(self.bn.running_var() + self.bn.eps())?.sqrt()?)?;
        let b = (beta - self.bn.running_mean().mul(&a)?)?;
        Ok((a, b))
    }

    /// Inference with the fast ops: `maxpool_3x3_s2_p1(relu(BN(conv(x))))`
    /// in one pass (the stem).
    fn forward_relu_maxpool_eval(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = self.conv.config();
        let (a, b) = self.folded_bn()?;
        ops::conv_affine_relu_maxpool_eval(x, self.conv.weight(), (&a, &b), cfg.stride, cfg.padding)
    }

    /// Inference with the fast ops: `relu(BN(conv(x)) + res)` in one pass.
    fn forward_add_relu_eval(&self, x: &Tensor, res: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = self.conv.config();
        let (a, b) = self.folded_bn()?;
        let w = self.conv.weight();
        ops::conv_affine_add_relu_eval(x, w, &a, &b, res, cfg.stride, cfg.padding)
    }
}

/// A ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    /// First conv (carries the stride).
    pub c1: ConvBn,
    /// Second conv.
    pub c2: ConvBn,
    /// Projection shortcut, when the shape changes.
    pub shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn forward_with(
        &self,
        x: &Tensor,
        train: bool,
        backend: Backend,
    ) -> candle_core::Result<Tensor> {
        if backend == Backend::FastCpu && train {
            if let Some(y) = self.fused_train(x)? {
                return Ok(y);
            }
        }
        let y = self.c1.forward_with(x, train, true, backend)?;
        let s = match &self.shortcut {
            Some(sc) => sc.forward_with(x, train, false, backend)?,
            None => x.clone(),
        };
        match backend {
            Backend::Stock => (self.c2.forward_with(&y, train, false, backend)? + s)?.relu(),
            Backend::FastCpu if !train => self.c2.forward_add_relu_eval(&y, &s),
            Backend::FastCpu => {
                ops::add_relu(&self.c2.forward_with(&y, train, false, backend)?, &s)
            }
        }
    }

    /// Its conv+BN pairs: `conv1`, `conv2` and the shortcut's, if any.
    pub fn conv_bns(&self) -> Vec<&ConvBn> {
        [Some(&self.c1), Some(&self.c2), self.shortcut.as_ref()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Training with the fast ops: the whole block as one op
    /// ([`ops::block_train`]), when it has the shape that op takes (3x3
    /// convs with padding 1, a 1x1 unpadded projection, one BN epsilon).
    fn fused_train(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let convs = self.conv_bns();
        let eps = self.c1.bn.eps();
        let fits = |c: &ConvBn, k: usize| {
            let (cfg, w) = (c.conv.config(), c.conv.weight());
            w.dim(2).ok() == Some(k)
                && w.dim(3).ok() == Some(k)
                && cfg.padding == k / 2
                && cfg.dilation == 1
                && cfg.groups == 1
                && c.bn.eps() == eps
        };
        let stride = self.c1.conv.config().stride;
        let shortcut_fits = self
            .shortcut
            .as_ref()
            .is_none_or(|s| fits(s, 1) && s.conv.config().stride == stride);
        if !fits(&self.c1, 3)
            || !fits(&self.c2, 3)
            || self.c2.conv.config().stride != 1
            || !shortcut_fits
        {
            return Ok(None);
        }
        let mut ws = Vec::new();
        let mut gbs = Vec::new();
        for c in &convs {
            let Some((g, b)) = c.bn.weight_and_bias() else {
                candle_core::bail!("batch norm without scale and shift")
            };
            ws.push(c.conv.weight().flatten_all()?);
            gbs.extend([g.clone(), b.clone()]);
        }
        let w1 = self.c1.conv.weight();
        let spec = ops::BlockSpec {
            cin: w1.dim(1)?,
            cout: w1.dim(0)?,
            stride,
            projection: self.shortcut.is_some(),
        };
        let (y, stats) =
            ops::block_train(x, &Tensor::cat(&ws, 0)?, &Tensor::cat(&gbs, 0)?, spec, eps)?;
        for (c, st) in convs.iter().zip(&stats) {
            c.update_running(st)?;
        }
        Ok(Some(y))
    }
}

/// Which implementation of the layers a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// candle's own ops (any device; the reference for the fast ops).
    Stock,
    /// The custom CPU ops of [`crate::ops`] (direct convs with fused BN on
    /// NHWC activations).
    FastCpu,
}

impl Backend {
    /// The fast ops on the CPU, stock candle elsewhere (CUDA).
    pub fn for_device(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::FastCpu
        } else {
            Self::Stock
        }
    }
}

/// Running-average momentum of BatchNorm statistics (candle-nn's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// The network.
#[derive(Debug, Clone)]
pub struct MiniResNet {
    /// Its configuration.
    pub arch: ArchConfig,
    /// Stem conv+BN.
    pub stem: ConvBn,
    /// Stages of blocks.
    pub stages: Vec<Vec<BasicBlock>>,
    /// Classifier.
    pub fc: Linear,
    /// Layer implementation used by [`Self::forward_t`].
    pub backend: Backend,
}

impl MiniResNet {
    /// Builds the network, creating (or loading) its variables through `vb`.
    pub fn new(arch: &ArchConfig, vb: VarBuilder) -> Result<Self> {
        arch.validate()?;
        let stem = ConvBn::new(vb.clone(), "stem.conv", "stem.bn", 3, arch.widths[0], 3, 1)?;
        let mut cin = arch.widths[0];
        let mut stages = Vec::new();
        for (s, (&width, &blocks)) in arch.widths.iter().zip(&arch.blocks).enumerate() {
            let mut stage = Vec::new();
            for b in 0..blocks {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let vbb = vb.pp(format!("layer{}.{b}", s + 1));
                let c1 = ConvBn::new(vbb.clone(), "conv1", "bn1", cin, width, 3, stride)?;
                let c2 = ConvBn::new(vbb.clone(), "conv2", "bn2", width, width, 3, 1)?;
                let shortcut = if stride != 1 || cin != width {
                    Some(ConvBn::new(
                        vbb.pp("shortcut"),
                        "conv",
                        "bn",
                        cin,
                        width,
                        1,
                        stride,
                    )?)
                } else {
                    None
                };
                stage.push(BasicBlock { c1, c2, shortcut });
                cin = width;
            }
            stages.push(stage);
        }
        let fc = candle_nn::linear(cin, arch.classes, vb.pp("fc"))?;
        Ok(Self {
            arch: arch.clone(),
            stem,
            stages,
            fc,
            backend: Backend::for_device(vb.device()),
        })
    }

    /// Every conv+BN pair, in forward order (stem, then each block's
    /// `conv1`, `conv2` and shortcut).
    pub fn conv_bns(&self) -> Vec<&ConvBn> {
        let mut v = vec![&self.stem];
        v.extend(self.stages.iter().flatten().flat_map(BasicBlock::conv_bns));
        v
    }

    /// Logits `(N, classes)` for a batch `(N, 3, H, W)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let backend = self.backend;
        // The fast ops work on NHWC activations (see `crate::ops`).
        let x = match backend {
            Backend::Stock => x.clone(),
            Backend::FastCpu => x.permute((0, 2, 3, 1))?.contiguous()?,
        };
        let mut x = if backend == Backend::FastCpu && !train && self.arch.maxpool {
            self.stem.forward_relu_maxpool_eval(&x)?
        } else {
            let x = self.stem.forward_with(&x, train, true, backend)?;
            match (self.arch.maxpool, backend) {
                (false, _) => x,
                (true, Backend::Stock) => maxpool_3x3_s2_p1(&x)?,
                (true, Backend::FastCpu) => ops::maxpool_3x3_s2_p1(&x)?,
            }
        };
        for stage in &self.stages {
            for block in stage {
                x = block.forward_with(&x, train, backend)?;
            }
        }
        // Global average pool.
        let x = match backend {
            Backend::Stock => x.mean(D::Minus1)?.mean(D::Minus1)?,
            Backend::FastCpu => x.flatten(1, 2)?.mean(1)?,
        };
        self.fc.forward(&x)
    }
}

/// Deterministic initial values of variable `name` with shape `dims`:
///
/// * conv weights: Kaiming normal, fan-out mode, ReLU gain
///   (`std = sqrt(2 / (out_c * k * k))`), as torchvision's ResNet;
/// * BN: scale 1 and shift 0, except the scale of the second BN of each
///   residual branch, which starts at 0 so every block starts as the
///   identity ("zero-init residual", Goyal et al. 2017);
/// * BN running statistics: mean 0, variance 1;
/// * FC weight: uniform in `±1/sqrt(fan_in)` (PyTorch's default); bias 0.
///
/// Random values come from a SplitMix64 stream keyed by `seed` and `name`.
pub fn init_values(name: &str, dims: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let key = name
        .bytes()
        .fold(seed ^ 0x1417, |h, b| crate::augment::mix(h ^ b as u64));
    let mut state = key;
    let mut uniform = move || {
        state = crate::augment::mix(state);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64 // (0, 1)
    };
    if name.ends_with("running_var") {
        return vec![1.0; n];
    }
    if name.ends_with("running_mean") || (name.contains(".bn") && name.ends_with(".bias")) {
        return vec![0.0; n];
    }
    if name.contains(".bn") && name.ends_with(".weight") {
        let zero = name.contains(".bn2.");
        return vec![if zero { 0.0 } else { 1.0 }; n];
    }
    if name == "fc.bias" {
        return vec![0.0; n];
    }
    if name == "fc.weight" {
        let bound = 1.0 / (dims[1] as f64).sqrt();
        return (0..n)
            .map(|_| ((2.0 * uniform() - 1.0) * bound) as f32)
            .collect();
    }
    // Conv weight (out, in, k, k).
    let fan_out = dims[0] * dims[2..].iter().product::<usize>();
    let std = (2.0 / fan_out as f64).sqrt();
    (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

/// 3x3 stride-2 max pool with padding 1 from stock candle ops, with a
/// backward pass (candle's own `max_pool2d` has no padding and no backward
/// for kernel != stride). [`crate::ops::maxpool_3x3_s2_p1`] is the fast one.
///
/// The input must be non-negative (it follows a ReLU), so zero padding is
/// the same as −∞ padding. The nine window taps are strided views of the
/// padded input, stacked; the output is the sum of the taps weighted by a
/// constant one-hot mask of the first maximum among the window's image
/// pixels (never the padding), in window order (row-major). So the gradient
/// flows to that one pixel, as in PyTorch and the fast op;
/// candle's `max` would give it to every tied tap, which over-counts the
/// gradient wherever an image has flat regions. Works on any device.
pub fn maxpool_3x3_s2_p1(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let taps = window_taps(x)?;
    // Which taps are image pixels rather than padding: a window whose
    // maximum is 0 must send its gradient to an image pixel, as the fast
    // op does, not to a padding zero.
    let inside = window_taps(&Tensor::ones((1, 1, h, w), x.dtype(), x.device())?)?;
    let max = taps.max_keepdim(4)?;
    let is_max = taps
        .broadcast_eq(&max)?
        .to_dtype(taps.dtype())?
        .broadcast_mul(&inside)?
        .detach();
    // Among tied taps, keep the first: the one where the running count of
    // maxima reaches 1.
    let first = is_max.mul(&is_max.cumsum(4)?.eq(1.0)?.to_dtype(taps.dtype())?)?;
    taps.mul(&first.detach())?.sum(4)
}

/// The nine taps of every 3x3 stride-2 window of `x` (zero-padded by 1),
/// stacked: `(n, c, ho, wo, 9)`, window order row-major.
fn window_taps(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // Pad to 2*ho + 2 rows/cols: 1 in front, the rest behind.
    let x = x
        .pad_with_zeros(2, 1, 2 * ho + 1 - h)?
        .pad_with_zeros(3, 1, 2 * wo + 1 - w)?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        // Rows dy, dy+2, …: take 2*ho rows from dy, keep every other one.
        let rows = x
            .narrow(2, dy, 2 * ho)?
            .reshape((n, c, ho, 2, 2 * wo + 2))?
            .narrow(3, 0, 1)?;
        for dx in 0..3 {
            let t = rows
                .narrow(4, dx, 2 * wo)?
                .reshape((n, c, ho, 1, wo, 2))?
                .narrow(5, 0, 1)?;
            taps.push(t.reshape((n, c, ho, wo))?);
        }
    }
    Tensor::stack(&taps, 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn seed_model_size() {
        let a = ArchConfig::seed();
        assert_eq!(a.parameters(), 1_334_618);
        assert_eq!(a.macs(), 18_531_584);
        let b = ArchConfig::no_maxpool();
        assert_eq!(b.parameters(), 1_334_618);
        assert_eq!((b.macs() as f64 / 1e6 * 10.0).round() / 10.0, 72.8);
    }

    #[test]
    fn built_model_matches_arch_count() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let arch = ArchConfig::seed();
        let m = MiniResNet::new(&arch, vb).unwrap();
        let data = vm.data().lock().unwrap();
        let trainable: usize = data
            .iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(trainable, arch.parameters());
        drop(data);
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        assert_eq!(m.forward_t(&x, true).unwrap().dims(), &[2, 10]);
        assert_eq!(m.forward_t(&x, false).unwrap().dims(), &[2, 10]);
    }

    /// The whole network on the fast CPU ops equals the stock candle ops:
    /// logits, every gradient, the BN running statistics after a training
    /// step, and the eval-mode logits.
    #[test]
    fn fast_and_stock_backends_agree_on_the_whole_network() {
        let arch = ArchConfig {
            widths: vec![4, 8],
            blocks: vec![2, 1],
            maxpool: true,
            classes: 3,
        };
        let x = Tensor::randn(0f32, 1., (6, 3, 12, 12), &Device::Cpu).unwrap();
        let run = |backend: Backend| {
            let t = crate::train::Trainee::new(&arch, 5, &Device::Cpu).unwrap();
            let mut model = t.model.clone();
            model.backend = backend;
            // Non-zero BN scales everywhere so every branch carries gradient.
            for (name, var) in t.named_vars() {
                if name.ends_with(".weight") && name.contains(".bn") {
                    var.set(&var.ones_like().unwrap().affine(0.5, 0.25).unwrap())
                        .unwrap();
                }
            }
            let logits = model.forward_t(&x, true).unwrap();
            let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
            for (name, var) in t.named_vars() {
                out.push(match grads.get(var.as_tensor()) {
                    Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
                    None => {
                        // Only running statistics have no gradient; compare
                        // their values after the step instead.
                        assert!(name.contains("running_"), "{name} has no gradient");
                        var.flatten_all().unwrap().to_vec1().unwrap()
                    }
                });
            }
            let eval = model.forward_t(&x, false).unwrap();
            out.push(eval.flatten_all().unwrap().to_vec1().unwrap());
            out
        };
        let (fast, stock) = (run(Backend::FastCpu), run(Backend::Stock));
        assert_eq!(fast.len(), stock.len());
        for (i, (a, b)) in fast.iter().zip(&stock).enumerate() {
            assert_eq!(a.len(), b.len());
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                err <= 1e-4 * scale,
                "tensor {i}: max error {err} (scale {scale})"
            );
        }
    }

    #[test]
    fn maxpool_matches_definition_and_backprops() {
        let dev = Device::Cpu;
        for &(h, w) in &[(4usize, 4usize), (5, 7), (32, 32), (1, 2)] {
            let x = Tensor::rand(0f32, 1., (2, 3, h, w), &dev).unwrap();
            let y = maxpool_3x3_s2_p1(&x).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let ys: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
            assert_eq!(y.dims(), &[2, 3, ho, wo]);
            for nc in 0..6 {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut m = f32::NEG_INFINITY;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (2 * oy + ky) as i64 - 1;
                                let ix = (2 * ox + kx) as i64 - 1;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    m = m.max(xs[nc * h * w + iy as usize * w + ix as usize]);
                                }
                            }
                        }
                        assert_eq!(ys[nc * ho * wo + oy * wo + ox], m);
                    }
                }
            }
            // Gradient of sum(y): each output sends 1 to its (unique) argmax.
            let v = candle_core::Var::from_tensor(&x).unwrap();
            let g = maxpool_3x3_s2_p1(v.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = g
                .get(v.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(gx, (2 * 3 * ho * wo) as f32);
        }
    }

    /// With tied maxima (flat image regions), the gradient goes to the
    /// first maximum in window order only, exactly as the fast op routes it.
    #[test]
    fn maxpool_ties_route_gradient_to_the_first_maximum() {
        let dev = Device::Cpu;
        // Values in {0, 0.5, 1}: most windows hold ties, some border
        // windows a maximum of 0 that ties with the padding.
        let x = Tensor::rand(0f32, 1., (2, 5, 9, 8), &dev)
            .unwrap()
            .affine(2.0, 0.0)
            .unwrap()
            .round()
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let w = Tensor::rand(0f32, 1., (2, 5, 5, 4), &dev).unwrap();
        let grad_of = |nhwc: bool| -> Vec<f32> {
            let v = candle_core::Var::from_tensor(&x).unwrap();
            let y = if nhwc {
                let t = v
                    .as_tensor()
                    .permute((0, 2, 3, 1))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                crate::ops::maxpool_3x3_s2_p1(&t)
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap()
            } else {
                maxpool_3x3_s2_p1(v.as_tensor()).unwrap()
            };
            let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = g.get(v.as_tensor()).unwrap();
            g.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (stock, fast) = (grad_of(false), grad_of(true));
        // The same pixels receive gradient; where a pixel is the maximum of
        // several windows its sum may round differently.
        for (i, (a, b)) in stock.iter().zip(&fast).enumerate() {
            assert_eq!(*a == 0.0, *b == 0.0, "pixel {i}: {a} vs {b}");
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "pixel {i}: {a} vs {b}"
            );
        }
        let total: f32 = stock.iter().sum();
        let expect = w.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((total - expect).abs() < 1e-4, "{total} vs {expect}");
    }
}
