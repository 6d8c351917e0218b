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

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{self, Epilogue, Isa, Tile};
use super::{profile, read, slice, tensor, Aligned, Phase, SyncPtr};

/// Shape of one convolution (NHWC input, OIHW weight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
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
    fn hp(&self) -> usize {
        self.h + 2 * self.pad
    }
    fn wp(&self) -> usize {
        self.w + 2 * self.pad
    }
    /// Output pixels per image.
    pub(super) fn p(&self) -> usize {
        self.ho * self.wo
    }
    /// Padding of `dz` for the stride-1 input gradient.
    fn q(&self) -> usize {
        self.k - 1 - self.pad
    }
    /// Whether the input gradient is a gather (stride 1, padding ≤ k − 1).
    fn dx_gathers(&self) -> bool {
        self.stride == 1 && self.pad < self.k
    }
    /// The batch cut into chunks of consecutive images: each holds at most
    /// about [`CHUNK_BYTES`] of padded input and output gradient (or one image),
    /// their count is a multiple of four (so two or four threads get equal
    /// work) unless there are fewer images, and sizes differ by at most one.
    /// Depends only on the shape, never on the thread count.
    fn chunks(&self) -> Vec<(usize, usize)> {
        let per_image =
            4 * (self.hp() * self.wp() * self.c + (self.ho + 2) * (self.wo + 2) * self.o);
        let cap = (CHUNK_BYTES / per_image.max(1)).max(1);
        let count = self.n.div_ceil(cap).max(4).next_multiple_of(4).min(self.n);
        (0..count)
            .map(|i| (i * self.n / count, (i + 1) * self.n / count))
            .collect()
    }
    /// Tap offsets `(A offset, B offset)` of a forward-style product over a
    /// padded image of width `wp` with `ch` channels and `b_tap` B elements
    /// per tap.
    fn taps(&self, wp: usize, ch: usize, b_tap: usize) -> Vec<(isize, isize)> {
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

/// Copies images `n0..n1` of `x` (NHWC) into the zeroed `dst`, leaving a
/// zero border of `pad` (rows `h + 2·pad`, columns `w + 2·pad`).
fn pad_images(x: &[f32], g: &Geom, (n0, n1): (usize, usize), dst: &mut [f32]) {
    let (hp, wp, c, p) = (g.hp(), g.wp(), g.c, g.pad);
    let img = g.h * g.w * c;
    for (i, d) in dst.chunks_mut(hp * wp * c).take(n1 - n0).enumerate() {
        let src = &x[(n0 + i) * img..][..img];
        for y in 0..g.h {
            d[((y + p) * wp + p) * c..][..g.w * c].copy_from_slice(&src[y * g.w * c..][..g.w * c]);
        }
    }
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

/// Weights OIHW → `[tap][o][c]`, taps flipped when `flip` (the stride-1
/// input gradient) or as they are (the strided scatter).
fn pack_backward(w: &[f32], g: &Geom, flip: bool) -> Aligned {
    let (o, c, kk) = (g.o, g.c, g.k * g.k);
    let mut out = Aligned::zeros(kk * c * o);
    let dst = SyncPtr(out.as_mut_ptr());
    // One output channel per task: its weight row (c·k·k values) stays in
    // L1 while every destination row gets c contiguous values.
    (0..o).into_par_iter().for_each(|oc| {
        let row = &w[oc * c * kk..][..c * kk];
        for t in 0..kk {
            let d = if flip { kk - 1 - t } else { t };
            for ic in 0..c {
                // SAFETY: (d, oc, ic) < (kk, o, c); tasks own disjoint oc.
                unsafe { *dst.ptr().add((d * o + oc) * c + ic) = row[ic * kk + t] };
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
        let isa = Isa::detect();
        let wf = pack_forward(w, g, (!self.train).then(|| &gb[..g.o]));
        let (p, o) = (g.p(), g.o);
        // Every element is written by the conv below.
        let mut z = super::output_vec(g.n * p * o);
        let zp = SyncPtr(z.as_mut_ptr());
        let per_chunk: Vec<Vec<Moments>> = g
            .chunks()
            .into_par_iter()
            .map(|(n0, n1)| {
                let mut xpad = vec![0f32; (n1 - n0) * g.hp() * g.wp() * g.c];
                pad_images(x, g, (n0, n1), &mut xpad);
                // SAFETY: images n0..n1 of z belong to this chunk only.
                let zc = unsafe {
                    std::slice::from_raw_parts_mut(zp.ptr().add(n0 * p * o), (n1 - n0) * p * o)
                };
                let epilogue = if self.train {
                    Epilogue::NONE
                } else {
                    Epilogue {
                        bias: gb[o..].as_ptr(),
                        res: res.map_or(std::ptr::null(), |r| r[n0 * p * o..].as_ptr()),
                        relu: self.relu,
                    }
                };
                conv_chunk(isa, g, (&xpad, &wf), n1 - n0, zc, epilogue);
                if self.train {
                    zc.chunks(p * o).map(|zi| image_moments(zi, o)).collect()
                } else {
                    Vec::new()
                }
            })
            .collect();
        (z, per_chunk.into_iter().flatten().collect())
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
        let g = Geom::new(l1.shape(), l2.shape(), self.stride, self.pad)?;
        let x = slice(s1, l1, "conv_bn")?;
        let w = slice(s2, l2, "conv_bn")?;
        let gb = slice(s3, l3, "conv_bn")?;
        if gb.len() != 2 * g.o {
            bail!(
                "conv_bn: {} output channels but BN parameters {:?}",
                g.o,
                l3.shape()
            )
        }
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

/// BN (+ ReLU) backward as per-channel coefficients:
/// `dz = c1·dy' + c2 + c3·z` with `dy' = dy` where the output was positive
/// (or everywhere without ReLU).
#[derive(Debug)]
pub(super) struct BnBackward {
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
    c1: Vec<f32>,
    c2: Vec<f32>,
    c3: Vec<f32>,
}

/// `dy` where the output `z·a + b` was positive (or everywhere without ReLU).
#[inline(always)]
fn masked(dy: f32, z: f32, a: f32, b: f32, relu: bool) -> f32 {
    if relu && z * a + b <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// Adds one image's `Σdy'` and `Σdy'·(z − mean)` per channel into `s1`, `s2`.
fn bn_sums(dy: &[f32], z: &[f32], s: &Saved, relu: bool, s1: &mut [f32], s2: &mut [f32]) {
    let o = s1.len();
    let (a, b, mean, s2) = (&s.a[..o], &s.b[..o], &s.mean[..o], &mut s2[..o]);
    for (dy, z) in dy.chunks_exact(o).zip(z.chunks_exact(o)) {
        for ch in 0..o {
            let d = masked(dy[ch], z[ch], a[ch], b[ch], relu);
            s1[ch] += d;
            s2[ch] += d * (z[ch] - mean[ch]);
        }
    }
}

pub(super) fn bn_backward(s: &Saved, dy: &[f32], g: &Geom, relu: bool) -> BnBackward {
    let (o, img) = (g.o, g.p() * g.o);
    // Per image Σdy' and Σdy'·(z − mean), then summed in image order.
    let parts: Vec<Moments> = dy
        .par_chunks(img)
        .zip(s.z.par_chunks(img))
        .map(|(dy, z)| {
            let (mut s1, mut s2) = (vec![0f32; o], vec![0f32; o]);
            if relu {
                bn_sums(dy, z, s, true, &mut s1, &mut s2);
            } else {
                bn_sums(dy, z, s, false, &mut s1, &mut s2);
            }
            (s1, s2)
        })
        .collect();
    let (mut sdy, mut sdyz) = (vec![0f64; o], vec![0f64; o]);
    for (p1, p2) in &parts {
        for ch in 0..o {
            sdy[ch] += p1[ch] as f64;
            sdyz[ch] += p2[ch] as f64;
        }
    }
    let m = (g.n * g.p()) as f32;
    let mut r = BnBackward {
        dgamma: vec![0.0; o],
        dbeta: vec![0.0; o],
        c1: vec![0.0; o],
        c2: vec![0.0; o],
        c3: vec![0.0; o],
    };
    for ch in 0..o {
        let inv = s.inv_std[ch];
        // dγ = Σ dy·x̂, dβ = Σ dy, dz = γ·inv/M · (M·dy − dβ − x̂·dγ).
        let (dbeta, dgamma) = (sdy[ch] as f32, sdyz[ch] as f32 * inv);
        let kf = s.gamma[ch] * inv / m;
        r.dgamma[ch] = dgamma;
        r.dbeta[ch] = dbeta;
        r.c1[ch] = kf * m;
        r.c3[ch] = -kf * dgamma * inv;
        r.c2[ch] = -kf * dbeta - r.c3[ch] * s.mean[ch];
    }
    r
}

/// `dz` of images `n0..n1` into the zeroed `dst`, whose image `i` pixel
/// (y, x) is at `(i·(ho + 2q) + y + q)·(wo + 2q) + x + q` (leaving a zero
/// border of `q`).
#[allow(clippy::too_many_arguments)]
fn dz_chunk(
    g: &Geom,
    dy: &[f32],
    s: &Saved,
    bn: &BnBackward,
    relu: bool,
    (n0, n1): (usize, usize),
    q: usize,
    dst: &mut [f32],
) {
    let (o, p) = (g.o, g.p());
    let (hq, wq) = (g.ho + 2 * q, g.wo + 2 * q);
    for i in 0..n1 - n0 {
        for y in 0..g.ho {
            let src = ((n0 + i) * p + y * g.wo) * o;
            let d0 = ((i * hq + y + q) * wq + q) * o;
            let (dy, z) = (&dy[src..][..g.wo * o], &s.z[src..][..g.wo * o]);
            let d = &mut dst[d0..][..g.wo * o];
            if relu {
                dz_pixels(d, dy, z, s, bn, true);
            } else {
                dz_pixels(d, dy, z, s, bn, false);
            }
        }
    }
}

/// `dz = c1·dy' + c2 + c3·z` for whole pixels (`o` channels each).
#[inline(always)]
fn dz_pixels(d: &mut [f32], dy: &[f32], z: &[f32], s: &Saved, bn: &BnBackward, relu: bool) {
    let o = bn.c1.len();
    let (a, b) = (&s.a[..o], &s.b[..o]);
    let (c1, c2, c3) = (&bn.c1[..o], &bn.c2[..o], &bn.c3[..o]);
    for ((d, dy), z) in d
        .chunks_exact_mut(o)
        .zip(dy.chunks_exact(o))
        .zip(z.chunks_exact(o))
    {
        for ch in 0..o {
            let m = masked(dy[ch], z[ch], a[ch], b[ch], relu);
            d[ch] = c1[ch] * m + c2[ch] + c3[ch] * z[ch];
        }
    }
}

/// Weight gradient of one chunk, `[tap][c][o]`, from its padded input and
/// its `dz` (border `q`).
fn dw_chunk(isa: Isa, g: &Geom, xpad: &[f32], dz: &[f32], images: usize, q: usize) -> Aligned {
    let (c, o, wp) = (g.c, g.o, g.wp());
    let (hq, wq) = (g.ho + 2 * q, g.wo + 2 * q);
    let segs: Vec<(isize, isize)> = (0..images)
        .flat_map(|i| (0..g.ho).map(move |y| (i, y)))
        .map(|(i, y)| {
            let a = (i * g.hp() + y * g.stride) * wp * c;
            let b = ((i * hq + y + q) * wq + q) * o;
            (a as isize, b as isize)
        })
        .collect();
    let mut dw = Aligned::zeros(g.k * g.k * c * o);
    for t in 0..g.k * g.k {
        let (ky, kx) = (t / g.k, t % g.k);
        let tile = Tile::flat(
            xpad[(ky * wp + kx) * c..].as_ptr(),
            1,
            (g.stride * c) as isize,
            dz.as_ptr(),
            o as isize,
            &segs,
            g.wo,
            dw[t * c * o..].as_mut_ptr(),
            o as isize,
            false,
        );
        // SAFETY: row r (channel) of step x in segment (i, y) reads
        // xpad[i][y·s + ky][x·s + kx][r], inside the padded chunk; B reads
        // dz[i][y + q][x + q][0..o]; out is the tap's c×o block.
        unsafe { kernel::product(isa, &tile, c, o) };
    }
    dw
}

/// Input gradient of one chunk into `dx` (the chunk's images, NHWC), plus
/// `res` (laid out like `dx`) when given.
fn dx_chunk(
    isa: Isa,
    g: &Geom,
    (wb, dz): (&[f32], &[f32]),
    images: usize,
    dx: &mut [f32],
    res: Option<&[f32]>,
) {
    let (c, o) = (g.c, g.o);
    let img = g.h * g.w * c;
    if g.dx_gathers() {
        let q = g.q();
        let (hq, wq) = (g.ho + 2 * q, g.wo + 2 * q);
        let taps = g.taps(wq, o, o * c);
        for i in 0..images {
            let out = &mut dx[i * g.h * g.w * c..][..g.h * g.w * c];
            let t = Tile {
                a: dz[i * hq * wq * o..].as_ptr(),
                a_rs: o as isize,
                rw: g.w,
                a_gs: (wq * o) as isize,
                a_ks: 1,
                b: wb.as_ptr(),
                b_ks: c as isize,
                segs: &taps,
                k: o,
                out: out.as_mut_ptr(),
                out_rs: c as isize,
                out_gs: (g.w * c) as isize,
                accumulate: false,
                epilogue: Epilogue {
                    res: res.map_or(std::ptr::null(), |r| r[i * img..].as_ptr()),
                    ..Epilogue::NONE
                },
            };
            // SAFETY: input pixel (y, x) reads dzpad[i][y + ty][x + tx] with
            // y + ty < h + k − 1 ≤ ho + 2q (stride 1); out (and the residual)
            // is the image.
            unsafe { kernel::product(isa, &t, g.h * g.w, c) };
        }
        return;
    }
    // Strided: scatter each tap of dz·Wᵀ into a padded gradient.
    let (hp, wp) = (g.hp(), g.wp());
    let mut dpad = Aligned::zeros(hp * wp * c);
    for i in 0..images {
        dpad.fill(0.0);
        for t in 0..g.k * g.k {
            let (ky, kx) = (t / g.k, t % g.k);
            let seg = [(0isize, (t * o * c) as isize)];
            let tile = Tile {
                a: dz[i * g.p() * o..].as_ptr(),
                a_rs: o as isize,
                rw: g.wo,
                a_gs: (g.wo * o) as isize,
                a_ks: 1,
                b: wb.as_ptr(),
                b_ks: c as isize,
                segs: &seg,
                k: o,
                out: dpad[(ky * wp + kx) * c..].as_mut_ptr(),
                out_rs: (g.stride * c) as isize,
                out_gs: (g.stride * wp * c) as isize,
                accumulate: true,
                epilogue: Epilogue::NONE,
            };
            // SAFETY: output pixel (y, x) adds into the padded gradient at
            // (y·s + ky, x·s + kx), inside it for every valid output.
            unsafe { kernel::product(isa, &tile, g.p(), c) };
        }
        let img = &mut dx[i * g.h * g.w * c..][..g.h * g.w * c];
        for y in 0..g.h {
            img[y * g.w * c..][..g.w * c]
                .copy_from_slice(&dpad[((y + g.pad) * wp + g.pad) * c..][..g.w * c]);
        }
        if let Some(r) = res {
            img.iter_mut()
                .zip(&r[i * g.h * g.w * c..])
                .for_each(|(d, r)| *d += r);
        }
    }
}

/// Input and weight gradients of the whole batch, chunk by chunk; `dx_res`
/// (laid out like `x`) is added to the input gradient.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_backward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    s: &Saved,
    bn: &BnBackward,
    relu: bool,
    need_dx: bool,
    dx_res: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let isa = Isa::detect();
    let wb = pack_backward(w, g, g.dx_gathers());
    let q = if need_dx && g.dx_gathers() { g.q() } else { 0 };
    let img_in = g.h * g.w * g.c;
    // Every element is written by `dx_chunk` (a gather, or the copy out
    // of the padded scatter).
    let mut dx = super::output_vec(if need_dx { g.n * img_in } else { 0 });
    let dxp = SyncPtr(dx.as_mut_ptr());
    let parts: Vec<Aligned> = g
        .chunks()
        .into_par_iter()
        .map(|(n0, n1)| {
            let images = n1 - n0;
            let mut xpad = vec![0f32; images * g.hp() * g.wp() * g.c];
            pad_images(x, g, (n0, n1), &mut xpad);
            let mut dz = Aligned::zeros(images * (g.ho + 2 * q) * (g.wo + 2 * q) * g.o);
            dz_chunk(g, dy, s, bn, relu, (n0, n1), q, &mut dz);
            let dw = dw_chunk(isa, g, &xpad, &dz, images, q);
            if need_dx {
                // SAFETY: images n0..n1 of dx belong to this chunk only.
                let dxc = unsafe {
                    std::slice::from_raw_parts_mut(dxp.ptr().add(n0 * img_in), images * img_in)
                };
                let res = dx_res.map(|r| &r[n0 * img_in..n1 * img_in]);
                dx_chunk(isa, g, (&wb, &dz), images, dxc, res);
            }
            dw
        })
        .collect();
    // Sum the chunks in order, then [tap][c][o] → OIHW by blocks of 16
    // output channels.
    let (kk, c, o) = (g.k * g.k, g.c, g.o);
    let mut sum = parts[0].to_vec();
    sum.par_chunks_mut(4096).enumerate().for_each(|(i, d)| {
        for part in &parts[1..] {
            d.iter_mut()
                .zip(&part[i * 4096..])
                .for_each(|(d, p)| *d += p);
        }
    });
    let mut dw = vec![0f32; o * c * kk];
    dw.par_chunks_mut(16 * c * kk)
        .enumerate()
        .for_each(|(blk, rows)| {
            let o0 = blk * 16;
            for t in 0..kk {
                for ic in 0..c {
                    let src = &sum[(t * c + ic) * o + o0..];
                    for (j, row) in rows.chunks_mut(c * kk).enumerate() {
                        row[ic * kk + t] = src[j];
                    }
                }
            }
        });
    (dx, dw)
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
