//! 3x3 stride-2 max pool with padding 1 on NHWC tensors, with a backward
//! pass that sends each output's gradient to the first maximum of its
//! window (row-major order, as PyTorch); a NaN maximum's gradient goes to
//! the window's first position.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{profile, read, slice, tensor, Phase};

/// The op; when its input is tracked (training) it records, per output
/// element, which window position held the maximum (the first one, as
/// PyTorch; a NaN maximum, equal to nothing, the window's first position),
/// for the backward pass.
#[derive(Debug, Clone, Default)]
struct MaxPoolOp {
    record: bool,
    argmax: Arc<Mutex<Vec<u8>>>,
}

/// (n, h, w, c, ho, wo) of an NHWC input.
fn pool_dims(s: &Shape) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (n, h, w, c) = s.dims4()?;
    if h == 0 || w == 0 {
        bail!("maxpool: empty input {s:?}")
    }
    Ok((n, h, w, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1))
}

/// Input offset of window position `t` of output (oy, ox), if inside.
fn tap(t: usize, oy: usize, ox: usize, h: usize, w: usize) -> Option<usize> {
    let iy = (2 * oy + t / 3).checked_sub(1).filter(|&y| y < h)?;
    let ix = (2 * ox + t % 3).checked_sub(1).filter(|&x| x < w)?;
    Some(iy * w + ix)
}

/// Running maximum: takes `v` where it is larger (the first maximum wins).
#[inline(always)]
fn window_max(y: &mut [f32], v: &[f32]) {
    for (y, &v) in y.iter_mut().zip(v) {
        *y = if v > *y { v } else { *y };
    }
}

/// Window positions of output (oy, ox) that are inside the image, in
/// row-major order, as input pixel indices.
fn window(oy: usize, ox: usize, h: usize, w: usize) -> impl Iterator<Item = usize> {
    (0..9).filter_map(move |t| tap(t, oy, ox, h, w))
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "fast-maxpool-3x3-s2-p1-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t0 = Instant::now();
        let (n, h, w, c, ho, wo) = pool_dims(l.shape())?;
        let x = slice(s, l, "maxpool")?;
        // Every output is written below (each window has its centre).
        let mut y = super::output_vec(n * ho * wo * c);
        let mut arg = vec![0u8; if self.record { y.len() } else { 0 }];
        let dims = (h, w, c, ho, wo);
        if self.record {
            y.par_chunks_mut(ho * wo * c)
                .zip(arg.par_chunks_mut(ho * wo * c))
                .zip(x.par_chunks(h * w * c))
                .for_each(|((y, arg), x)| pool_image(y, Some(arg), x, dims));
        } else {
            y.par_chunks_mut(ho * wo * c)
                .zip(x.par_chunks(h * w * c))
                .for_each(|(y, x)| pool_image(y, None, x, dims));
        }
        *self.argmax.lock().unwrap_or_else(|e| e.into_inner()) = arg;
        profile::add(Phase::Elementwise, t0);
        Ok((CpuStorage::F32(y), Shape::from((n, ho, wo, c))))
    }

    /// Each output's gradient goes to the window position that the forward
    /// pass recorded.
    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let t0 = Instant::now();
        let (_, h, w, c, ho, wo) = pool_dims(x.shape())?;
        let arg = self.argmax.lock().unwrap_or_else(|e| e.into_inner());
        if arg.len() != y.elem_count() {
            bail!("maxpool: backward pass without a recording forward pass")
        }
        let dims = (h, w, c, ho, wo);
        let dx = read(dy, "maxpool backward", |dy| {
            // Every element is written: each image is zeroed, then routed
            // to (while it is in cache).
            let mut dx = super::output_vec(x.elem_count());
            dx.par_chunks_mut(h * w * c)
                .zip(arg.par_chunks(ho * wo * c).zip(dy.par_chunks(ho * wo * c)))
                .for_each(|(dx, (arg, dy))| {
                    dx.fill(0.0);
                    route(dx, arg, dy, dims);
                });
            Ok(dx)
        })?;
        profile::add(Phase::Elementwise, t0);
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// `(h, w, c, ho, wo)` of the max pool of an `h` × `w` image of `c`
/// channels.
pub(super) fn pooled(h: usize, w: usize, c: usize) -> (usize, usize, usize, usize, usize) {
    (h, w, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1)
}

/// One image's max pool into `y`, and the window position (in
/// [`window`] order) of each maximum into `arg` when given.
pub(super) fn pool_image(
    y: &mut [f32],
    mut arg: Option<&mut [u8]>,
    x: &[f32],
    (h, w, c, ho, wo): (usize, usize, usize, usize, usize),
) {
    for oy in 0..ho {
        for ox in 0..wo {
            let o = (oy * wo + ox) * c;
            let y = &mut y[o..][..c];
            let mut taps = window(oy, ox, h, w);
            // The window's centre is always inside the image.
            let first = taps.next().expect("a window inside the image");
            y.copy_from_slice(&x[first * c..][..c]);
            match arg.as_deref_mut() {
                None => taps.for_each(|i| window_max(y, &x[i * c..][..c])),
                Some(arg) => {
                    let arg = &mut arg[o..][..c];
                    arg.fill(0);
                    for (t, i) in taps.enumerate() {
                        let t = t as u8 + 1;
                        for ((y, a), &v) in y.iter_mut().zip(arg.iter_mut()).zip(&x[i * c..][..c]) {
                            (*y, *a) = if v > *y { (v, t) } else { (*y, *a) };
                        }
                    }
                }
            }
        }
    }
}

/// One image's max-pool backward: `dy` of each output to the window
/// position recorded in `arg`, all channels of a position at once (`dy`
/// where the position holds the maximum, +0 elsewhere: no change).
fn route(
    dx: &mut [f32],
    arg: &[u8],
    dy: &[f32],
    (h, w, c, ho, wo): (usize, usize, usize, usize, usize),
) {
    for oy in 0..ho {
        for ox in 0..wo {
            let o = (oy * wo + ox) * c;
            let (arg, dy) = (&arg[o..o + c], &dy[o..o + c]);
            for (t, i) in window(oy, ox, h, w).enumerate() {
                let d = &mut dx[i * c..][..c];
                for ((d, &a), &g) in d.iter_mut().zip(arg).zip(dy) {
                    *d += if a == t as u8 { g } else { 0.0 };
                }
            }
        }
    }
}

/// 3x3 stride-2 max pool with padding 1 (padding never wins) of an NHWC
/// tensor, with its backward pass.
pub fn maxpool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    let op = MaxPoolOp {
        record: x.track_op(),
        argmax: Arc::default(),
    };
    x.contiguous()?.apply_op1(op)
}
