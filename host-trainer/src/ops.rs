//! Fast CPU training ops for candle, as custom ops with their own backward
//! passes. candle's autograd stays the framework: these are nodes in its
//! graph like any other op.
//!
//! * [`conv_bn_train`]: conv + BatchNorm (batch statistics) + optional
//!   ReLU as one op. The conv is im2col + GEMM (the `gemm` crate candle
//!   itself uses) for the forward pass, the input gradient (GEMM + col2im,
//!   instead of candle's per-pixel `conv_transpose2d`) and the weight
//!   gradient (GEMM). The batch is cut into chunks of images whose im2col
//!   matrix stays in cache, one group of chunks per thread. The GEMM output
//!   is channel-major, so BN statistics and the BN backward pass run over
//!   contiguous rows, and the NCHW transpose is folded into the BN affine.
//!   One op instead of three also saves candle's backprop a zero-fill and
//!   an add of a full-size gradient per op.
//! * [`conv_affine_eval`]: the inference twin, with the running statistics
//!   folded into a per-channel affine.
//! * [`add_relu`]: the residual `relu(a + b)` with a one-pass backward.
//! * [`maxpool_3x3_s2_p1`]: max pool with padding and a backward pass.
//!
//! All tensors are NCHW f32 on the CPU. Work is split over rayon's pool
//! (`RAYON_NUM_THREADS`, default one thread per core). Every op is checked
//! against the stock candle op and by finite differences in the tests below.

use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

// ---------------------------------------------------------------------------
// Threads

/// Sets up threads for CPU training; call once at start-up, before any
/// candle op. Returns the worker count.
///
/// The custom ops run on rayon's global pool with `threads` workers
/// (default: `$RAYON_NUM_THREADS`, else one per core). candle's own
/// elementwise pool (sized from `$RAYON_NUM_THREADS` too) is kept to the
/// calling thread: its main thread spins while it waits for its workers,
/// which on a 2-core machine fights the rayon workers for the cores (17%
/// of a step measured). Only the small ops (loss, FC, optimizer, gradient
/// sums) still run through candle's pool.
pub fn configure_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    let n = threads
        .or_else(|| std::env::var("RAYON_NUM_THREADS").ok()?.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Must happen before candle reads it; nothing else runs yet.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    if rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_err()
    {
        // Already built (e.g. called twice): keep what exists.
        return Ok(rayon::current_num_threads());
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Raw access helpers

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expects f32 tensors")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: expects contiguous tensors"),
    }
}

/// Runs `f` on the f32 data of a CPU tensor (made contiguous first).
fn read<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => f(slice(s, l, op)?),
        _ => bail!("{op}: CPU tensors only"),
    }
}

fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: every use below writes disjoint index sets from different threads
// and the pointee outlives the parallel section.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// `dst (m×n) = [dst +] a (m×k) · b (k×n)`; each matrix is given by its
/// pointer, row stride and column stride (in elements).
///
/// # Safety
/// The pointers must cover the strided matrices; `dst` must not alias.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    accumulate: bool,
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            accumulate,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

// ---------------------------------------------------------------------------
// Convolution

/// Shape of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &Shape, wt: &Shape, stride: usize, pad: usize) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let (o, ci, k, k2) = wt.dims4()?;
        if n == 0 || ci != c || k != k2 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
            bail!("conv2d: input {x:?} does not fit weight {wt:?} (stride {stride}, pad {pad})")
        }
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
        })
    }
    /// Rows of the im2col matrix (C·k·k).
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Output pixels per image.
    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    /// Columns of the im2col matrix (N·Ho·Wo).
    fn cols(&self) -> usize {
        self.n * self.hw_out()
    }
    /// Output columns `ox` whose input column is inside the image for tap `kx`.
    fn valid_ox(&self, kx: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).div_ceil(self.stride);
        let hi = if self.w + self.pad > kx {
            ((self.w - 1 + self.pad - kx) / self.stride + 1).min(self.wo)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride + ky).checked_sub(self.pad)?;
        (iy < self.h).then_some(iy)
    }
}

/// im2col of images `n0..n1` into `col` (C·k·k rows of (n1 − n0)·Ho·Wo):
/// `col[(c, ky, kx)][(n − n0, oy, ox)] = x[n, c, oy·s + ky − p, ox·s + kx − p]`,
/// zero outside the image. Every element of `col` is written.
fn im2col_into(x: &[f32], g: &Geom, (n0, n1): (usize, usize), col: &mut [f32]) {
    let cols = (n1 - n0) * g.hw_out();
    for (r, row) in col.chunks_mut(cols).take(g.rows()).enumerate() {
        let (c, ky, kx) = (r / (g.k * g.k), r / g.k % g.k, r % g.k);
        let (lo, hi) = g.valid_ox(kx);
        for n in n0..n1 {
            let plane = &x[(n * g.c + c) * g.h * g.w..][..g.h * g.w];
            for oy in 0..g.ho {
                let dst = &mut row[((n - n0) * g.ho + oy) * g.wo..][..g.wo];
                let Some(iy) = g.input_row(oy, ky) else {
                    dst.fill(0.0);
                    continue;
                };
                let src = &plane[iy * g.w..][..g.w];
                dst[..lo].fill(0.0);
                dst[hi..].fill(0.0);
                if g.stride == 1 {
                    let ix0 = lo + kx - g.pad;
                    dst[lo..hi].copy_from_slice(&src[ix0..ix0 + hi - lo]);
                } else {
                    for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                        *d = src[ox * g.stride + kx - g.pad];
                    }
                }
            }
        }
    }
}

/// col2im, the adjoint of [`im2col_into`]: adds every entry of `col` (for
/// images `n0..n1`) into `dx`, the input gradient of those images.
fn col2im_add(col: &[f32], g: &Geom, (n0, n1): (usize, usize), dx: &mut [f32]) {
    let cols = (n1 - n0) * g.hw_out();
    for (r, row) in col.chunks(cols).take(g.rows()).enumerate() {
        let (c, ky, kx) = (r / (g.k * g.k), r / g.k % g.k, r % g.k);
        let (lo, hi) = g.valid_ox(kx);
        for n in 0..n1 - n0 {
            for oy in 0..g.ho {
                let Some(iy) = g.input_row(oy, ky) else {
                    continue;
                };
                let src = &row[(n * g.ho + oy) * g.wo..][..g.wo];
                let dst = &mut dx[((n * g.c + c) * g.h + iy) * g.w..][..g.w];
                if g.stride == 1 {
                    let ix0 = lo + kx - g.pad;
                    dst[ix0..ix0 + hi - lo]
                        .iter_mut()
                        .zip(&src[lo..hi])
                        .for_each(|(d, &v)| *d += v);
                } else {
                    for (ox, &v) in src.iter().enumerate().take(hi).skip(lo) {
                        dst[ox * g.stride + kx - g.pad] += v;
                    }
                }
            }
        }
    }
}

/// How a batch is cut for the conv: chunks of `per_chunk` images (about
/// 1024 output columns, so a chunk's im2col matrix stays in the L2 cache),
/// and groups of `per_group` images (whole chunks), one group per thread.
/// The partition depends only on the shape and the thread count, so
/// results are deterministic.
#[derive(Debug, Clone, Copy)]
struct Chunks {
    per_chunk: usize,
    per_group: usize,
}

impl Chunks {
    fn new(g: &Geom) -> Self {
        let parts = threads();
        let per_chunk = (1024 / g.hw_out().max(1)).clamp(1, g.n.div_ceil(parts).max(1));
        let chunks = g.n.div_ceil(per_chunk);
        let per_group = chunks.div_ceil(parts) * per_chunk;
        Self {
            per_chunk,
            per_group,
        }
    }

    /// Image ranges of the chunks of the group starting at image `g0`.
    fn chunks_of(&self, g0: usize, n: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let end = (g0 + self.per_group).min(n);
        (g0..end)
            .step_by(self.per_chunk)
            .map(move |c0| (c0, (c0 + self.per_chunk).min(end)))
    }
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

/// What the forward pass keeps for the backward pass.
#[derive(Debug, Default)]
struct Saved {
    /// Conv output before BN, channel-major (O, N·Ho·Wo).
    z: Vec<f32>,
    /// Per-channel BN scale and shift as applied: y = relu?(z·a + b).
    a: Vec<f32>,
    b: Vec<f32>,
    /// Per-channel batch mean and 1/sqrt(var + eps).
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// BN scale γ.
    gamma: Vec<f32>,
}

/// Fused conv (no bias) + BatchNorm + optional ReLU.
///
/// Arguments: the input (N, C, H, W), the weight (O, C, k, k) and a (2, O)
/// tensor: (γ, β) in training mode, the folded (scale, shift) in
/// inference mode.
#[derive(Debug, Clone)]
struct ConvBnOp {
    stride: usize,
    pad: usize,
    eps: f32,
    relu: bool,
    train: bool,
    saved: Arc<Mutex<Saved>>,
    stats: Arc<Mutex<BnStats>>,
}

impl ConvBnOp {
    fn lock(&self) -> std::sync::MutexGuard<'_, Saved> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// y (N, O, HW) = relu?(z·a + b), z channel-major (O, N·HW).
fn affine_to_nchw(z: &[f32], a: &[f32], b: &[f32], relu: bool, g: &Geom) -> Vec<f32> {
    let (o, hw, p) = (g.o, g.hw_out(), g.cols());
    let mut y = vec![0f32; z.len()];
    y.par_chunks_mut(o * hw).enumerate().for_each(|(n, dst)| {
        for oc in 0..o {
            let (a, b) = (a[oc], b[oc]);
            let src = &z[oc * p + n * hw..][..hw];
            let d = &mut dst[oc * hw..][..hw];
            if relu {
                d.iter_mut()
                    .zip(src)
                    .for_each(|(d, &v)| *d = (v * a + b).max(0.0));
            } else {
                d.iter_mut().zip(src).for_each(|(d, &v)| *d = v * a + b);
            }
        }
    });
    y
}

impl CustomOp3 for ConvBnOp {
    fn name(&self) -> &'static str {
        "fast-conv-bn"
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
        let (k, p, hw) = (g.rows(), g.cols(), g.hw_out());
        let ch = Chunks::new(&g);
        let mut z = vec![0f32; g.o * p];
        let zp = SyncPtr(z.as_mut_ptr());
        (0..g.n)
            .into_par_iter()
            .step_by(ch.per_group)
            .for_each(|g0| {
                let mut col = vec![0f32; k * ch.per_chunk * hw];
                for (n0, n1) in ch.chunks_of(g0, g.n) {
                    im2col_into(x, &g, (n0, n1), &mut col);
                    // SAFETY: z's columns n0·hw..n1·hw of every row belong to
                    // this chunk only; W is (O, K), col is (K, cols).
                    unsafe {
                        sgemm(
                            (g.o, (n1 - n0) * hw, k),
                            (zp.ptr().add(n0 * hw), p as isize, 1),
                            false,
                            (w.as_ptr(), k as isize, 1),
                            (col.as_ptr(), ((n1 - n0) * hw) as isize, 1),
                            gemm::Parallelism::None,
                        )
                    };
                }
            });
        if !self.train {
            let y = affine_to_nchw(&z, &gb[..g.o], &gb[g.o..], self.relu, &g);
            return Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))));
        }
        let (gamma, beta) = (&gb[..g.o], &gb[g.o..]);
        let m = p as f64;
        // Two-pass mean and variance per channel (rows of z are contiguous).
        let stats: Vec<(f32, f32)> = z
            .par_chunks(p)
            .map(|row| {
                let mean = (row.iter().map(|&v| v as f64).sum::<f64>() / m) as f32;
                let ss: f64 = row
                    .chunks(1024)
                    .map(|c| c.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() as f64)
                    .sum();
                (mean, (ss / m) as f32)
            })
            .collect();
        let mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
        let var: Vec<f32> = stats.iter().map(|s| s.1).collect();
        let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let a: Vec<f32> = gamma.iter().zip(&inv_std).map(|(g, i)| g * i).collect();
        let b: Vec<f32> = (0..g.o).map(|c| beta[c] - mean[c] * a[c]).collect();
        let y = affine_to_nchw(&z, &a, &b, self.relu, &g);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = BnStats {
            mean: mean.clone(),
            var,
            count: p,
        };
        *self.lock() = Saved {
            z,
            a,
            b,
            mean,
            inv_std,
            gamma: gamma.to_vec(),
        };
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
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
        let (k, p, hw) = (g.rows(), g.cols(), g.hw_out());
        let saved = std::mem::take(&mut *self.lock());
        if saved.z.len() != g.o * p {
            bail!("conv_bn: backward pass without a forward pass (or run twice)")
        }
        let relu = self.relu;
        // BN (+ ReLU) backward into dz, channel-major like z.
        let mut dz = vec![0f32; g.o * p];
        let sums: Vec<(f32, f32)> = read(dy, "conv_bn backward", |dy| {
            Ok(dz
                .par_chunks_mut(p)
                .enumerate()
                .map(|(oc, dz)| {
                    let z = &saved.z[oc * p..][..p];
                    let (a, b, mean) = (saved.a[oc], saved.b[oc], saved.mean[oc]);
                    let grad = |n: usize, s: usize| {
                        let d = dy[(n * g.o + oc) * hw + s];
                        if relu && z[n * hw + s] * a + b <= 0.0 {
                            0.0
                        } else {
                            d
                        }
                    };
                    let (mut sdy, mut sdyz) = (0f64, 0f64);
                    for n in 0..g.n {
                        let (mut s1, mut s2) = (0f32, 0f32);
                        for s in 0..hw {
                            let d = grad(n, s);
                            dz[n * hw + s] = d;
                            s1 += d;
                            s2 += d * (z[n * hw + s] - mean);
                        }
                        sdy += s1 as f64;
                        sdyz += s2 as f64;
                    }
                    let inv = saved.inv_std[oc];
                    // dγ = Σ dy·x̂, dβ = Σ dy,
                    // dz = γ·inv/M · (M·dy − dβ − x̂·dγ).
                    let (dbeta, dgamma) = (sdy as f32, sdyz as f32 * inv);
                    let m = p as f32;
                    let kf = saved.gamma[oc] * inv / m;
                    for (d, &zv) in dz.iter_mut().zip(z) {
                        let xhat = (zv - mean) * inv;
                        *d = kf * (m * *d - dbeta - xhat * dgamma);
                    }
                    (dgamma, dbeta)
                })
                .collect())
        })?;
        // Per group of images: recompute the im2col chunk by chunk (in
        // cache), dW += dz · colᵀ, and dx = col2im(Wᵀ · dz) for the group's
        // images. Partial dW per group, summed in group order.
        let need_dx = x.track_op();
        let ch = Chunks::new(&g);
        let chw = g.c * g.h * g.w;
        let mut dx = vec![0f32; if need_dx { g.n * chw } else { 0 }];
        let dx_groups: Vec<&mut [f32]> = if need_dx {
            dx.chunks_mut(ch.per_group * chw).collect()
        } else {
            (0..g.n.div_ceil(ch.per_group))
                .map(|_| Default::default())
                .collect()
        };
        let partial: Vec<Vec<f32>> = read(x, "conv_bn backward", |x| {
            read(w, "conv_bn backward", |w| {
                Ok(dx_groups
                    .into_par_iter()
                    .enumerate()
                    .map(|(gi, dxg)| {
                        let g0 = gi * ch.per_group;
                        let cols_max = ch.per_chunk * hw;
                        let mut col = vec![0f32; k * cols_max];
                        let mut dcol = vec![0f32; if need_dx { k * cols_max } else { 0 }];
                        let mut dwt = vec![0f32; k * g.o];
                        for (n0, n1) in ch.chunks_of(g0, g.n) {
                            let cols = (n1 - n0) * hw;
                            im2col_into(x, &g, (n0, n1), &mut col);
                            let dzc = dz[n0 * hw..].as_ptr();
                            // dWᵀ (K, O) += col (K, cols) · dzᵀ (cols, O).
                            // SAFETY: dz's chunk columns (rows p apart) read
                            // transposed, col (K, cols), dwt (K, O).
                            unsafe {
                                sgemm(
                                    (k, g.o, cols),
                                    (dwt.as_mut_ptr(), g.o as isize, 1),
                                    true,
                                    (col.as_ptr(), cols as isize, 1),
                                    (dzc, 1, p as isize),
                                    gemm::Parallelism::None,
                                )
                            };
                            if need_dx {
                                // SAFETY: Wᵀ is W read with swapped strides;
                                // dcol is (K, cols).
                                unsafe {
                                    sgemm(
                                        (k, cols, g.o),
                                        (dcol.as_mut_ptr(), cols as isize, 1),
                                        false,
                                        (w.as_ptr(), 1, k as isize),
                                        (dzc, p as isize, 1),
                                        gemm::Parallelism::None,
                                    )
                                };
                                let off = (n0 - g0) * chw;
                                col2im_add(
                                    &dcol,
                                    &g,
                                    (n0, n1),
                                    &mut dxg[off..off + (n1 - n0) * chw],
                                );
                            }
                        }
                        let mut dw = vec![0f32; g.o * k];
                        for (r, row) in dwt.chunks(g.o).enumerate() {
                            for (o, &v) in row.iter().enumerate() {
                                dw[o * k + r] = v;
                            }
                        }
                        dw
                    })
                    .collect())
            })
        })?;
        let mut dw = partial[0].clone();
        for part in &partial[1..] {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        let dx = if need_dx {
            Some(tensor(dx, x.shape())?)
        } else {
            None
        };
        let dgb: Vec<f32> = sums
            .iter()
            .map(|s| s.0)
            .chain(sums.iter().map(|s| s.1))
            .collect();
        Ok((
            dx,
            Some(tensor(dw, w.shape())?),
            Some(tensor(dgb, gb.shape())?),
        ))
    }
}

/// Training-mode conv (no bias, zero padding `pad`, stride `stride`) of `x`
/// (N, C, H, W) with `w` (O, C, k, k), then BatchNorm with batch statistics,
/// scale `gamma` and shift `beta`, then a ReLU when `relu`. Returns the
/// output and the batch statistics (for the running averages).
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
/// (BatchNorm with running statistics folded into `scale` and `shift`).
/// No gradient.
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

// ---------------------------------------------------------------------------
// Residual add + ReLU

#[derive(Debug, Clone, Copy)]
struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "fast-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "add_relu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            )
        }
        let (a, b) = (slice(s1, l1, "add_relu")?, slice(s2, l2, "add_relu")?);
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(4096)
            .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
            .for_each(|(d, (a, b))| {
                for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                    *d = (a + b).max(0.0);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = read(y, "add_relu backward", |y| {
            read(dy, "add_relu backward", |dy| {
                let mut g = vec![0f32; y.len()];
                g.par_chunks_mut(4096)
                    .zip(y.par_chunks(4096).zip(dy.par_chunks(4096)))
                    .for_each(|(g, (y, dy))| {
                        for ((g, &y), &d) in g.iter_mut().zip(y).zip(dy) {
                            *g = if y > 0.0 { d } else { 0.0 };
                        }
                    });
                Ok(g)
            })
        })?;
        let g = tensor(g, y.shape())?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `relu(a + b)` for two tensors of the same shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}

// ---------------------------------------------------------------------------
// Max pool 3x3, stride 2, padding 1

#[derive(Debug, Clone, Copy)]
struct MaxPoolOp;

fn pool_dims(s: &Shape) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, c, h, w) = s.dims4()?;
    if h == 0 || w == 0 {
        bail!("maxpool: empty input {s:?}")
    }
    Ok((n * c, h, w, (h - 1) / 2 + 1, (w - 1) / 2 + 1))
}

/// Index (in the plane) of the first maximum of output (oy, ox)'s window.
#[inline]
fn argmax_3x3(p: &[f32], h: usize, w: usize, oy: usize, ox: usize) -> usize {
    let mut best = usize::MAX;
    let mut m = f32::NEG_INFINITY;
    for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
        for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
            let v = p[iy * w + ix];
            if best == usize::MAX || v > m {
                m = v;
                best = iy * w + ix;
            }
        }
    }
    best
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "fast-maxpool-3x3-s2-p1"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (planes, h, w, ho, wo) = pool_dims(l.shape())?;
        let x = slice(s, l, "maxpool")?;
        let mut y = vec![0f32; planes * ho * wo];
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each(|(d, p)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        d[oy * wo + ox] = p[argmax_3x3(p, h, w, oy, ox)];
                    }
                }
            });
        let (n, c, _, _) = l.shape().dims4()?;
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (planes, h, w, ho, wo) = pool_dims(x.shape())?;
        let dx = read(x, "maxpool backward", |x| {
            read(dy, "maxpool backward", |dy| {
                let mut dx = vec![0f32; planes * h * w];
                dx.par_chunks_mut(h * w)
                    .zip(x.par_chunks(h * w).zip(dy.par_chunks(ho * wo)))
                    .for_each(|(d, (p, g))| {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                d[argmax_3x3(p, h, w, oy, ox)] += g[oy * wo + ox];
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// 3x3 stride-2 max pool with padding 1 (padding never wins), with its
/// backward pass: each output's gradient goes to the first maximum of its
/// window.
pub fn maxpool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPoolOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = crate::augment::mix(s);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        tensor(v, shape).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Gradients of `sum(f(x) · r)` for a fixed random `r`, through candle.
    fn grads_of(
        f: &dyn Fn(&[Tensor]) -> Tensor,
        inputs: &[Tensor],
        seed: u64,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = rand(y.dims(), seed);
        let loss = (&y * &r).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let grads = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
        (y, grads)
    }

    /// Stock candle conv → BN with batch statistics → ReLU.
    fn stock_conv_bn(t: &[Tensor], stride: usize, pad: usize, relu: bool) -> Tensor {
        let z = t[0].conv2d(&t[1], pad, stride, 1, 1).unwrap();
        let c = z.dim(1).unwrap();
        let mean4 = |v: &Tensor| {
            v.mean_keepdim(0)
                .unwrap()
                .mean_keepdim(2)
                .unwrap()
                .mean_keepdim(3)
                .unwrap()
        };
        let zc = z.broadcast_sub(&mean4(&z)).unwrap();
        let var = mean4(&zc.sqr().unwrap());
        let y = zc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&t[2].reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&t[3].reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    fn fused(t: &[Tensor], stride: usize, pad: usize, relu: bool) -> Tensor {
        conv_bn_train(&t[0], &t[1], &t[2], &t[3], stride, pad, 1e-5, relu)
            .unwrap()
            .0
    }

    #[test]
    fn conv_bn_matches_stock_candle_forward_and_backward() {
        // (n, c, h, w, o, k, stride, pad): 3x3 s1/s2, 1x1 s2, odd sizes,
        // 2x2 inputs, the stem.
        let cases = [
            (2, 3, 8, 8, 5, 3, 1, 1),
            (3, 4, 7, 9, 6, 3, 2, 1),
            (2, 5, 9, 7, 3, 1, 2, 0),
            (3, 2, 2, 2, 2, 3, 1, 1),
            (4, 3, 32, 32, 16, 3, 1, 1),
            (2, 8, 4, 4, 8, 3, 2, 1),
            // Enough images for several chunks per thread group.
            (70, 2, 8, 8, 3, 3, 1, 1),
            (37, 2, 6, 6, 3, 3, 2, 1),
        ];
        for (i, &(n, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
            for relu in [false, true] {
                let inputs = [
                    rand(&[n, c, h, w], 10 + i as u64),
                    rand(&[o, c, k, k], 20 + i as u64),
                    rand(&[o], 30 + i as u64).affine(0.5, 1.0).unwrap(),
                    rand(&[o], 40 + i as u64),
                ];
                let (y1, g1) = grads_of(&|t| fused(t, s, p, relu), &inputs, 7);
                let (y2, g2) = grads_of(&|t| stock_conv_bn(t, s, p, relu), &inputs, 7);
                assert!(
                    max_abs_diff(&y1, &y2) < 1e-4,
                    "case {i} relu {relu}: forward"
                );
                for k in 0..4 {
                    let d = max_abs_diff(&g1[k], &g2[k]);
                    assert!(d < 1e-3, "case {i} relu {relu}: gradient {k} off by {d}");
                }
            }
        }
    }

    /// Central finite differences of `sum(f(x)·r)` against the analytic
    /// gradient, at a few coordinates of each input.
    fn check_finite_differences(f: &dyn Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], tol: f32) {
        let (y, grads) = grads_of(f, inputs, 99);
        let r = rand(y.dims(), 99);
        let loss = |ts: &[Tensor]| -> f64 {
            let y: Vec<f32> = f(ts).flatten_all().unwrap().to_vec1().unwrap();
            let r: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
            y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let h = 1e-2f32;
        for (k, inp) in inputs.iter().enumerate() {
            let base: Vec<f32> = inp.flatten_all().unwrap().to_vec1().unwrap();
            let g: Vec<f32> = grads[k].flatten_all().unwrap().to_vec1().unwrap();
            for idx in (0..base.len()).step_by(base.len().div_ceil(7)) {
                let eval = |delta: f32| {
                    let mut v = base.clone();
                    v[idx] += delta;
                    let mut ts = inputs.to_vec();
                    ts[k] = tensor(v, inp.dims()).unwrap();
                    loss(&ts)
                };
                let num = ((eval(h) - eval(-h)) / (2.0 * h as f64)) as f32;
                assert!(
                    (num - g[idx]).abs() <= tol * (1.0 + num.abs()),
                    "input {k} index {idx}: numeric {num} analytic {}",
                    g[idx]
                );
            }
        }
    }

    #[test]
    fn conv_bn_finite_differences() {
        let inputs = [
            rand(&[3, 3, 5, 6], 1),
            rand(&[4, 3, 3, 3], 2),
            rand(&[4], 3).affine(0.5, 1.0).unwrap(),
            rand(&[4], 4),
        ];
        check_finite_differences(&|t| fused(t, 2, 1, false), &inputs, 3e-2);
    }

    #[test]
    fn conv_bn_reports_batch_statistics() {
        let x = rand(&[4, 3, 5, 5], 3);
        let w = rand(&[2, 3, 3, 3], 4);
        let ones = Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        let zeros = ones.zeros_like().unwrap();
        let (_, st) = conv_bn_train(&x, &w, &ones, &zeros, 1, 1, 1e-5, false).unwrap();
        let z = x.conv2d(&w, 1, 1, 1, 1).unwrap();
        let zc = z.transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let mean: Vec<f32> = zc.mean(1).unwrap().to_vec1().unwrap();
        let var: Vec<f32> = zc
            .broadcast_sub(&zc.mean_keepdim(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(st.count, 100);
        for c in 0..2 {
            assert!((st.mean[c] - mean[c]).abs() < 1e-5);
            assert!((st.var[c] - var[c]).abs() < 1e-4);
        }
    }

    #[test]
    fn conv_affine_eval_matches_stock_candle() {
        let x = rand(&[2, 3, 6, 5], 9);
        let w = rand(&[4, 3, 3, 3], 10);
        let a = rand(&[4], 11);
        let b = rand(&[4], 12);
        for relu in [false, true] {
            for (s, p) in [(1, 1), (2, 1)] {
                let y = conv_affine_eval(&x, &w, &a, &b, s, p, relu).unwrap();
                let r = x
                    .conv2d(&w, p, s, 1, 1)
                    .unwrap()
                    .broadcast_mul(&a.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap()
                    .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap();
                let r = if relu { r.relu().unwrap() } else { r };
                assert!(max_abs_diff(&y, &r) < 1e-5);
            }
        }
    }

    #[test]
    fn add_relu_matches_stock_candle() {
        let a = rand(&[2, 3, 4, 5], 12);
        let b = rand(&[2, 3, 4, 5], 13);
        let (y1, g1) = grads_of(
            &|t| add_relu(&t[0], &t[1]).unwrap(),
            &[a.clone(), b.clone()],
            14,
        );
        let (y2, g2) = grads_of(&|t| (&t[0] + &t[1]).unwrap().relu().unwrap(), &[a, b], 14);
        assert_eq!(max_abs_diff(&y1, &y2), 0.0);
        assert_eq!(max_abs_diff(&g1[0], &g2[0]), 0.0);
        assert_eq!(max_abs_diff(&g1[1], &g2[1]), 0.0);
    }

    #[test]
    fn maxpool_matches_the_stacked_view_version() {
        for &(h, w) in &[(4usize, 4usize), (5, 7), (32, 32), (1, 2), (3, 1)] {
            // Positive and distinct (no ties, and the stock version's zero
            // padding never wins).
            let x = (rand(&[2, 3, h, w], h as u64 * 31 + w as u64).abs().unwrap() + 0.01).unwrap();
            let (y1, g1) = grads_of(
                &|t| maxpool_3x3_s2_p1(&t[0]).unwrap(),
                std::slice::from_ref(&x),
                15,
            );
            let (y2, g2) = grads_of(
                &|t| crate::model::maxpool_3x3_s2_p1(&t[0]).unwrap(),
                &[x],
                15,
            );
            assert_eq!(max_abs_diff(&y1, &y2), 0.0, "{h}x{w}");
            assert_eq!(max_abs_diff(&g1[0], &g2[0]), 0.0, "{h}x{w}");
        }
    }

    #[test]
    fn maxpool_ties_go_to_the_first_maximum() {
        let x = tensor(vec![0.0; 16], (1, 1, 4, 4)).unwrap();
        let (_, g) = grads_of(&|t| maxpool_3x3_s2_p1(&t[0]).unwrap(), &[x], 1);
        let g: Vec<f32> = g[0].flatten_all().unwrap().to_vec1().unwrap();
        // Windows start at (0,0), (0,1), (1,0), (1,1): one nonzero each.
        assert_eq!(g.iter().filter(|v| **v != 0.0).count(), 4);
        assert!(g[0] != 0.0 && g[1] != 0.0 && g[4] != 0.0 && g[5] != 0.0);
    }

    #[test]
    fn maxpool_finite_differences() {
        let x = rand(&[1, 2, 5, 5], 17);
        check_finite_differences(&|t| maxpool_3x3_s2_p1(&t[0]).unwrap(), &[x], 1e-2);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = rand(&[1, 3, 4, 4], 1);
        let g = rand(&[2], 3);
        assert!(conv_bn_train(&x, &rand(&[2, 4, 3, 3], 2), &g, &g, 1, 1, 1e-5, false).is_err());
        assert!(conv_bn_train(&x, &rand(&[3, 3, 3, 3], 2), &g, &g, 1, 1, 1e-5, false).is_err());
        let empty = Tensor::zeros((0, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(conv_bn_train(&empty, &rand(&[2, 3, 3, 3], 2), &g, &g, 1, 1, 1e-5, false).is_err());
        assert!(add_relu(&x, &rand(&[1, 3, 4, 5], 5)).is_err());
    }
}
