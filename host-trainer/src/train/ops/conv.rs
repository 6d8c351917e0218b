//! Convolution + BatchNorm (+ ReLU) on NHWC tensors, as one candle op.
//!
//! Every product is [`kernel::product`] over views of NHWC data, with no
//! im2col matrix:
//!
//! * **forward**: for each output row, `z[px][o] = Σ_tap Σ_c xpad[px·s + tap][c]
//!   · W[tap][c][o]` (rows = pixels, A = the zero-padded input, B = the
//!   weights packed `[tap][c][o]`);
//! * **input gradient**, stride 1: the same product over the zero-padded
//!   `dz` with the flipped, transposed weights `[tap][o][c]`; stride > 1:
//!   each tap's `dz · Wᵀ` added into the padded input gradient at the
//!   strided positions;
//! * **weight gradient**: `dW[tap][c][o] = Σ_px xpad[px·s + tap][c] · dz[px][o]`
//!   (rows = input channels, steps = pixels of a chunk of images).
//!
//! BN statistics are gathered per image while its output is in cache and
//! combined in f64 in image order; the weight gradient is summed per chunk of
//! images (a partition that depends only on the shape) and the chunks are
//! added in order. So results do not depend on the thread count or on
//! scheduling.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::backward::{bn_backward, conv_backward};
use super::kernel::{self, Epilogue, Isa, Tile};
use super::{profile, read, slice, tensor, Aligned, Phase, SyncPtr};

/// Shape of one convolution (NHWC input, OIHW weight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub o: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    pub fn new(x: &Shape, wt: &Shape, stride: usize, pad: usize) -> Result<Self> {
        let (n, h, w, c) = x.dims4()?;
        let (o, ci, k, k2) = wt.dims4()?;
        if n == 0 || ci != c || k != k2 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
            bail!(
                "conv2d: NHWC input {x:?} does not fit weight {wt:?} (stride {stride}, pad {pad})"
            )
        }
        Ok(Self {
            n,
            h,
            w,
            c,
            o,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
        })
    }
    /// Padded input rows and columns.
    pub(super) fn hp(&self) -> usize {
        self.h + 2 * self.pad
    }
    pub(super) fn wp(&self) -> usize {
        self.w + 2 * self.pad
    }
    /// Output pixels per image.
    pub(super) fn p(&self) -> usize {
        self.ho * self.wo
    }
    /// Padding of `dz` for the stride-1 input gradient.
    pub(super) fn q(&self) -> usize {
        self.k - 1 - self.pad
    }
    /// Whether the input gradient is a gather (stride 1, padding ≤ k − 1).
    pub(super) fn dx_gathers(&self) -> bool {
        self.stride == 1 && self.pad < self.k
    }
    /// The batch cut into chunks of consecutive images: each holds at most
    /// about [`CHUNK_BYTES`] of padded input and output gradient, or twice
    /// its weight-gradient part if that is larger (or one image),
    /// their count is a multiple of four (so two or four threads get equal
    /// work) unless there are fewer images, and sizes differ by at most one.
    /// Depends only on the shape, never on the thread count.
    pub(super) fn chunks(&self) -> Vec<(usize, usize)> {
        let per_image =
            4 * (self.hp() * self.wp() * self.c + (self.ho + 2) * (self.wo + 2) * self.o);
        // A chunk's weight-gradient part is at most about its data, or the
        // parts and their sum cost more than the products (small images,
        // many channels).
        let dw_part = 4 * self.k * self.k * self.c * self.o;
        let cap = (CHUNK_BYTES.max(2 * dw_part) / per_image.max(1)).max(1);
        let count = self.n.div_ceil(cap).max(4).next_multiple_of(4).min(self.n);
        (0..count)
            .map(|i| (i * self.n / count, (i + 1) * self.n / count))
            .collect()
    }
    /// Tap offsets `(A offset, B offset)` of a forward-style product over a
    /// padded image of width `wp` with `ch` channels and `b_tap` B elements
    /// per tap.
    pub(super) fn taps(&self, wp: usize, ch: usize, b_tap: usize) -> Vec<(isize, isize)> {
        (0..self.k * self.k)
            .map(|t| {
                let (ky, kx) = (t / self.k, t % self.k);
                (((ky * wp + kx) * ch) as isize, (t * b_tap) as isize)
            })
            .collect()
    }
}

/// Padded input and output gradient per chunk of images (see
/// [`Geom::chunks`]).
const CHUNK_BYTES: usize = 192 * 1024;

/// Copies images `n0..n1` of `x` (NHWC) into `dst` with a zero border of
/// `pad` (rows `h + 2·pad`, columns `w + 2·pad`), writing every element of
/// those images (so `dst` need not be zeroed first).
pub(super) fn pad_images(x: &[f32], g: &Geom, (n0, n1): (usize, usize), dst: &mut [f32]) {
    let (wp, c, p) = (g.wp(), g.c, g.pad);
    let row = g.w * c;
    for (i, d) in dst
        .chunks_exact_mut(g.hp() * wp * c)
        .take(n1 - n0)
        .enumerate()
    {
        let src = &x[(n0 + i) * g.h * row..][..g.h * row];
        for (y, drow) in d.chunks_exact_mut(wp * c).enumerate() {
            if y < p || y >= p + g.h {
                drow.fill(0.0);
                continue;
            }
            let (left, rest) = drow.split_at_mut(p * c);
            let (mid, right) = rest.split_at_mut(row);
            left.fill(0.0);
            mid.copy_from_slice(&src[(y - p) * row..][..row]);
            right.fill(0.0);
        }
    }
}

/// Images `n0..n1` of `x` with the zero border of `g.pad` (the images
/// themselves when there is no padding).
pub(super) fn padded_chunk<'a>(x: &'a [f32], g: &Geom, (n0, n1): (usize, usize)) -> Cow<'a, [f32]> {
    if g.pad == 0 {
        let img = g.h * g.w * g.c;
        return Cow::Borrowed(&x[n0 * img..n1 * img]);
    }
    // Every element is written by `pad_images` (border and copy).
    let mut xpad = super::output_vec((n1 - n0) * g.hp() * g.wp() * g.c);
    pad_images(x, g, (n0, n1), &mut xpad);
    Cow::Owned(xpad)
}

/// Weights OIHW → `[tap][c][o]`, each scaled by `scale[o]` if given.
fn pack_forward(w: &[f32], g: &Geom, scale: Option<&[f32]>) -> Aligned {
    let (o, c, kk) = (g.o, g.c, g.k * g.k);
    let mut out = Aligned::zeros(kk * c * o);
    let dst = SyncPtr(out.as_mut_ptr());
    // Blocks of 16 output channels: their 16 weight rows stay in L1 while
    // each destination row gets 16 contiguous values.
    (0..o.div_ceil(16)).into_par_iter().for_each(|blk| {
        let (o0, o1) = (blk * 16, (blk * 16 + 16).min(o));
        for ic in 0..c {
            for t in 0..kk {
                for oc in o0..o1 {
                    let v = w[(oc * c + ic) * kk + t] * scale.map_or(1.0, |s| s[oc]);
                    // SAFETY: (t, ic, oc) < (kk, c, o); blocks own disjoint oc.
                    unsafe { *dst.ptr().add((t * c + ic) * o + oc) = v };
                }
            }
        }
    });
    out
}

/// Forward conv of images `n0..n1` (padded in `xpad`) into `z` (NHWC, the
/// chunk's images only), weights packed `[tap][c][o]`, through `epilogue`.
fn conv_chunk(
    isa: Isa,
    g: &Geom,
    (xpad, wf): (&[f32], &[f32]),
    images: usize,
    z: &mut [f32],
    epilogue: Epilogue,
) {
    let (wp, c, o) = (g.wp(), g.c, g.o);
    let taps = g.taps(wp, c, c * o);
    let img_in = g.hp() * wp * c;
    for i in 0..images {
        let out = &mut z[i * g.p() * o..][..g.p() * o];
        let t = Tile {
            a: xpad[i * img_in..].as_ptr(),
            a_rs: (g.stride * c) as isize,
            rw: g.wo,
            a_gs: (g.stride * wp * c) as isize,
            a_ks: 1,
            b: wf.as_ptr(),
            b_ks: o as isize,
            segs: &taps,
            k: c,
            out: out.as_mut_ptr(),
            out_rs: o as isize,
            out_gs: (g.wo * o) as isize,
            accumulate: false,
            epilogue: Epilogue {
                // The residual is laid out like the output: image i's part.
                res: if epilogue.res.is_null() {
                    epilogue.res
                } else {
                    epilogue.res.wrapping_add(i * g.p() * o)
                },
                ..epilogue
            },
        };
        // SAFETY: output pixel (y, x) reads xpad[i][y·s + ky][x·s + kx][0..c],
        // inside the padded image for every valid output; B reads the
        // k·k·c·o packed weights; out is the image's p·o outputs.
        unsafe { kernel::product(isa, &t, g.p(), o) };
    }
}

/// One image's per-channel mean and M2 (see [`image_moments`]).
pub(super) type Moments = (Vec<f32>, Vec<f32>);

/// Per-image channel mean and M2 (sum of squared deviations) of `z`.
fn image_moments(z: &[f32], o: usize) -> (Vec<f32>, Vec<f32>) {
    let p = z.len() / o;
    let mut mean = vec![0f32; o];
    for px in z.chunks(o) {
        mean.iter_mut().zip(px).for_each(|(m, &v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= p as f32);
    let mut m2 = vec![0f32; o];
    for px in z.chunks(o) {
        for ((s, &v), &m) in m2.iter_mut().zip(px).zip(&mean) {
            *s += (v - m) * (v - m);
        }
    }
    (mean, m2)
}

/// Statistics of one training-mode [`conv_bn_train`] call, per output channel.
#[derive(Debug, Clone, Default)]
pub struct BnStats {
    /// Batch mean of the conv output.
    pub mean: Vec<f32>,
    /// Biased batch variance of the conv output.
    pub var: Vec<f32>,
    /// Elements per channel (N·Ho·Wo).
    pub count: usize,
}

/// Chan's parallel combination of per-image moments (each over `p`
/// elements), in image order, in f64.
fn combine_moments(parts: &[Moments], p: usize, o: usize) -> BnStats {
    let mut mean = vec![0f64; o];
    let mut m2 = vec![0f64; o];
    let mut count = 0f64;
    for (pm, pm2) in parts {
        let nb = p as f64;
        let tot = count + nb;
        for ch in 0..o {
            let d = pm[ch] as f64 - mean[ch];
            mean[ch] += d * nb / tot;
            m2[ch] += pm2[ch] as f64 + d * d * count * nb / tot;
        }
        count = tot;
    }
    BnStats {
        mean: mean.iter().map(|&m| m as f32).collect(),
        var: m2.iter().map(|&s| (s / count) as f32).collect(),
        count: count as usize,
    }
}

/// `y = relu?(z·a + b)` per channel (NHWC: channels innermost).
pub(super) fn affine(z: &[f32], a: &[f32], b: &[f32], relu: bool, y: &mut [f32]) {
    let o = a.len();
    y.par_chunks_mut(o * 64)
        .zip(z.par_chunks(o * 64))
        .for_each(|(y, z)| {
            for (y, z) in y.chunks_mut(o).zip(z.chunks(o)) {
                for (((y, &z), &a), &b) in y.iter_mut().zip(z).zip(a).zip(b) {
                    let v = z * a + b;
                    *y = if relu { v.max(0.0) } else { v };
                }
            }
        });
}

/// BatchNorm with batch statistics on a conv output `z` (and its
/// per-image moments): what the backward pass keeps, and the statistics.
pub(super) fn train_bn(
    z: Vec<f32>,
    moments: &[Moments],
    g: &Geom,
    gb: &[f32],
    eps: f32,
) -> (Saved, BnStats) {
    let st = combine_moments(moments, g.p(), g.o);
    let (gamma, beta) = (&gb[..g.o], &gb[g.o..]);
    let inv_std: Vec<f32> = st.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let a: Vec<f32> = gamma.iter().zip(&inv_std).map(|(g, i)| g * i).collect();
    let b: Vec<f32> = (0..g.o).map(|c| beta[c] - st.mean[c] * a[c]).collect();
    let saved = Saved {
        z,
        a,
        b,
        mean: st.mean.clone(),
        inv_std,
        gamma: gamma.to_vec(),
    };
    (saved, st)
}

/// A conv op's input, weight and (γ, β) or (scale, shift) slices.
type Operands<'a> = (&'a [f32], &'a [f32], &'a [f32]);

/// What the forward pass keeps for the backward pass.
#[derive(Debug, Default)]
pub(super) struct Saved {
    /// Conv output before BN (NHWC).
    pub z: Vec<f32>,
    /// Per-channel BN scale and shift as applied: y = relu?(z·a + b).
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// Per-channel batch mean and 1/sqrt(var + eps).
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// BN scale γ.
    pub gamma: Vec<f32>,
}

/// Fused conv (no bias) + BatchNorm + optional ReLU on NHWC tensors.
///
/// Arguments: the input (N, H, W, C), the weight (O, C, k, k) and a (2, O)
/// tensor: (γ, β) in training mode, the folded (scale, shift) in
/// inference mode.
#[derive(Debug, Clone)]
pub(super) struct ConvBnOp {
    stride: usize,
    pad: usize,
    eps: f32,
    relu: bool,
    train: bool,
    saved: Arc<Mutex<Saved>>,
    stats: Arc<Mutex<BnStats>>,
}

impl ConvBnOp {
    /// A training-mode op for [`ConvBnOp::forward`] (raw conv outputs and
    /// per-image moments).
    pub(super) fn train_conv(stride: usize, pad: usize) -> Self {
        Self {
            stride,
            pad,
            eps: 0.0,
            relu: false,
            train: true,
            saved: Arc::default(),
            stats: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Saved> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Conv of the whole batch; in inference mode with the affine and ReLU
    /// applied per image (output `y`), in training mode the raw `z` and
    /// each image's moments.
    pub(super) fn forward(
        &self,
        g: &Geom,
        x: &[f32],
        w: &[f32],
        gb: &[f32],
        res: Option<&[f32]>,
    ) -> (Vec<f32>, Vec<Moments>) {
        let wf = pack_forward(w, g, (!self.train).then(|| &gb[..g.o]));
        let img_out = g.p() * g.o;
        // Every element is written by the conv below.
        let mut z = super::output_vec(g.n * img_out);
        let zp = SyncPtr(z.as_mut_ptr());
        let per_chunk: Vec<Vec<Moments>> = g
            .chunks()
            .into_par_iter()
            .map(|(n0, n1)| {
                // SAFETY: images n0..n1 of z belong to this chunk only.
                let zc = unsafe {
                    std::slice::from_raw_parts_mut(zp.ptr().add(n0 * img_out), (n1 - n0) * img_out)
                };
                self.forward_chunk(g, (x, &wf, gb), res, (n0, n1), zc)
            })
            .collect();
        (z, per_chunk.into_iter().flatten().collect())
    }

    /// The geometry and the three operands (input, weight, and the 2·O
    /// BN parameters or folded affine) of a `CustomOp3` call on this op.
    fn operands<'a>(
        &self,
        [(s1, l1), (s2, l2), (s3, l3)]: [(&'a CpuStorage, &Layout); 3],
        op: &str,
    ) -> Result<(Geom, Operands<'a>)> {
        let g = Geom::new(l1.shape(), l2.shape(), self.stride, self.pad)?;
        let (x, w, gb) = (slice(s1, l1, op)?, slice(s2, l2, op)?, slice(s3, l3, op)?);
        if gb.len() != 2 * g.o {
            bail!(
                "{op}: {} output channels but BN parameters {:?}",
                g.o,
                l3.shape()
            )
        }
        Ok((g, (x, w, gb)))
    }

    /// [`ConvBnOp::forward`] of images `n0..n1` into `zc` (theirs only),
    /// weights packed by [`pack_forward`]; the moments in training mode.
    fn forward_chunk(
        &self,
        g: &Geom,
        (x, wf, gb): (&[f32], &[f32], &[f32]),
        res: Option<&[f32]>,
        (n0, n1): (usize, usize),
        zc: &mut [f32],
    ) -> Vec<Moments> {
        let (p, o) = (g.p(), g.o);
        let xpad = padded_chunk(x, g, (n0, n1));
        let epilogue = if self.train {
            Epilogue::NONE
        } else {
            Epilogue {
                bias: gb[o..].as_ptr(),
                res: res.map_or(std::ptr::null(), |r| r[n0 * p * o..].as_ptr()),
                relu: self.relu,
            }
        };
        conv_chunk(Isa::detect(), g, (&xpad, wf), n1 - n0, zc, epilogue);
        if self.train {
            zc.chunks(p * o).map(|zi| image_moments(zi, o)).collect()
        } else {
            Vec::new()
        }
    }
}

impl CustomOp3 for ConvBnOp {
    fn name(&self) -> &'static str {
        "fast-conv-bn-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, (x, w, gb)) = self.operands([(s1, l1), (s2, l2), (s3, l3)], "conv_bn")?;
        let shape = Shape::from((g.n, g.ho, g.wo, g.o));
        let t0 = Instant::now();
        let (z, moments) = self.forward(&g, x, w, gb, None);
        profile::add(Phase::Conv, t0);
        if !self.train {
            return Ok((CpuStorage::F32(z), shape));
        }
        let t0 = Instant::now();
        let (saved, st) = train_bn(z, &moments, &g, gb, self.eps);
        // Every element is written by `affine`.
        let mut y = super::output_vec(saved.z.len());
        affine(&saved.z, &saved.a, &saved.b, self.relu, &mut y);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = st;
        *self.lock() = saved;
        profile::add(Phase::Bn, t0);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gb: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !self.train {
            bail!("conv_bn: no backward pass in inference mode")
        }
        let g = Geom::new(x.shape(), w.shape(), self.stride, self.pad)?;
        let saved = std::mem::take(&mut *self.lock());
        if saved.z.len() != g.n * g.p() * g.o {
            bail!("conv_bn: backward pass without a forward pass (or run twice)")
        }
        let t0 = Instant::now();
        let bn = read(dy, "conv_bn backward", |dy| {
            Ok(bn_backward(&saved, dy, &g, self.relu))
        })?;
        profile::add(Phase::Bn, t0);
        let t0 = Instant::now();
        let need_dx = x.track_op();
        let (dx, dw) = read(x, "conv_bn backward", |x| {
            read(w, "conv_bn backward", |w| {
                read(dy, "conv_bn backward", |dy| {
                    Ok(conv_backward(
                        &g, x, w, dy, &saved, &bn, self.relu, need_dx, None,
                    ))
                })
            })
        })?;
        profile::add(Phase::Conv, t0);
        let dx = if need_dx {
            Some(tensor(dx, x.shape())?)
        } else {
            None
        };
        let dgb: Vec<f32> = bn.dgamma.iter().chain(&bn.dbeta).copied().collect();
        Ok((
            dx,
            Some(tensor(dw, w.shape())?),
            Some(tensor(dgb, gb.shape())?),
        ))
    }
}

/// Training-mode conv (no bias, zero padding `pad`, stride `stride`) of `x`
/// (N, H, W, C) with `w` (O, C, k, k), then BatchNorm with batch
/// statistics, scale `gamma` and shift `beta`, then a ReLU when `relu`.
/// Returns the (N, Ho, Wo, O) output and the batch statistics (for the
/// running averages).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_train(
    x: &Tensor,
    w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stride: usize,
    pad: usize,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BnStats)> {
    let stats = Arc::new(Mutex::new(BnStats::default()));
    let op = ConvBnOp {
        stride,
        pad,
        eps: eps as f32,
        relu,
        train: true,
        saved: Arc::default(),
        stats: stats.clone(),
    };
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    let y = x.contiguous()?.apply_op3(&w.contiguous()?, &gb, op)?;
    let s = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((y, s))
}

/// Inference-mode conv + per-channel affine `relu?(conv(x, w)·scale + shift)`
/// on NHWC tensors (BatchNorm with running statistics folded into `scale`
/// and `shift`; the scale is folded into the weights). No gradient.
pub fn conv_affine_eval(
    x: &Tensor,
    w: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    stride: usize,
    pad: usize,
    relu: bool,
) -> Result<Tensor> {
    let op = ConvBnOp {
        stride,
        pad,
        eps: 0.0,
        relu,
        train: false,
        saved: Arc::default(),
        stats: Arc::default(),
    };
    let gb = Tensor::stack(&[scale, shift], 0)?;
    x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &gb, &op)
}

/// Inference-mode conv + affine + residual + ReLU,
/// `relu(conv(x, w)·scale + shift + res)`: the end of a residual block in
/// one pass. Arguments: the
/// input, the parameters `[w (O·C·k·k), scale (O), shift (O)]` flattened,
/// and the residual (N, Ho, Wo, O).
#[derive(Debug, Clone)]
struct ConvResidualEval {
    stride: usize,
    pad: usize,
    k: usize,
}

impl CustomOp3 for ConvResidualEval {
    fn name(&self) -> &'static str {
        "fast-conv-affine-add-relu-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, _, c) = l1.shape().dims4()?;
        let (_, _, _, o) = l3.shape().dims4()?;
        let k = self.k;
        let params = slice(s2, l2, "conv_residual")?;
        if params.len() != o * c * k * k + 2 * o {
            bail!(
                "conv_residual: {} parameters for {o}x{c}x{k}x{k}",
                params.len()
            )
        }
        let g = Geom::new(
            l1.shape(),
            &Shape::from((o, c, k, k)),
            self.stride,
            self.pad,
        )?;
        if l3.shape().dims() != [g.n, g.ho, g.wo, g.o] {
            bail!(
                "conv_residual: residual {:?} does not fit the output",
                l3.shape()
            )
        }
        let (w, gb) = params.split_at(o * c * k * k);
        let op = ConvBnOp {
            stride: self.stride,
            pad: self.pad,
            eps: 0.0,
            relu: true,
            train: false,
            saved: Arc::default(),
            stats: Arc::default(),
        };
        let t0 = Instant::now();
        let x = slice(s1, l1, "conv_residual")?;
        let res = slice(s3, l3, "conv_residual")?;
        let (y, _) = op.forward(&g, x, w, gb, Some(res));
        profile::add(Phase::Conv, t0);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.ho, g.wo, g.o))))
    }
}

/// Inference-mode `relu(conv(x, w)·scale + shift + res)` on NHWC tensors:
/// [`conv_affine_eval`] with the residual add and ReLU of a block's end
/// in its epilogue. No gradient.
#[allow(clippy::too_many_arguments)]
pub fn conv_affine_add_relu_eval(
    x: &Tensor,
    w: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    res: &Tensor,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let k = w.dim(2)?;
    let params = Tensor::cat(&[&w.flatten_all()?, scale, shift], 0)?;
    x.contiguous()?.apply_op3_no_bwd(
        &params,
        &res.contiguous()?,
        &ConvResidualEval { stride, pad, k },
    )
}

/// Inference-mode stem: `maxpool_3x3_s2_p1(relu(conv(x, w)·scale +
/// shift))` chunk by chunk, so the conv's full-size output stays in cache
/// between the two instead of going through memory. Arguments as
/// [`ConvBnOp`]'s in inference mode.
#[derive(Debug, Clone)]
struct ConvPoolEval {
    conv: ConvBnOp,
}

impl CustomOp3 for ConvPoolEval {
    fn name(&self) -> &'static str {
        "fast-conv-affine-relu-maxpool-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.conv;
        let (g, (x, w, gb)) = op.operands([(s1, l1), (s2, l2), (s3, l3)], "conv_pool")?;
        let t0 = Instant::now();
        let wf = pack_forward(w, &g, Some(&gb[..g.o]));
        let dims = super::pool::pooled(g.ho, g.wo, g.o);
        let img_out = dims.3 * dims.4 * g.o;
        // Every element is written by `pool_image`.
        let mut y = super::output_vec(g.n * img_out);
        let yp = SyncPtr(y.as_mut_ptr());
        g.chunks().into_par_iter().for_each(|(n0, n1)| {
            // Every element is written by the conv.
            let mut zc = super::output_vec((n1 - n0) * g.p() * g.o);
            op.forward_chunk(&g, (x, &wf, gb), None, (n0, n1), &mut zc);
            // SAFETY: images n0..n1 of y belong to this chunk only.
            let yc = unsafe {
                std::slice::from_raw_parts_mut(yp.ptr().add(n0 * img_out), (n1 - n0) * img_out)
            };
            for (yi, zi) in yc
                .chunks_exact_mut(img_out)
                .zip(zc.chunks_exact(g.p() * g.o))
            {
                super::pool::pool_image(yi, None, zi, dims);
            }
        });
        profile::add(Phase::Conv, t0);
        Ok((CpuStorage::F32(y), Shape::from((g.n, dims.3, dims.4, g.o))))
    }
}

/// Inference-mode `maxpool_3x3_s2_p1(relu(conv(x, w)·scale + shift))` on
/// NHWC tensors: [`conv_affine_eval`] with ReLU, then
/// [`super::maxpool_3x3_s2_p1`], in one pass. No gradient.
pub fn conv_affine_relu_maxpool_eval(
    x: &Tensor,
    w: &Tensor,
    (scale, shift): (&Tensor, &Tensor),
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let conv = ConvBnOp {
        stride,
        pad,
        eps: 0.0,
        relu: true,
        train: false,
        saved: Arc::default(),
        stats: Arc::default(),
    };
    let gb = Tensor::stack(&[scale, shift], 0)?;
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &gb, &ConvPoolEval { conv })
}
