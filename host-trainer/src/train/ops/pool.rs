//! 3x3 stride-2 max pool with padding 1 on NHWC tensors, with a backward
//! pass that sends each output's gradient to the first maximum of its
//! window (row-major order, as PyTorch); a NaN maximum's gradient goes to
//! the window's first position.

use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{profile, read, slice, tensor, Phase};

#[derive(Debug, Clone, Copy, Default)]
struct MaxPoolOp;

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
        y.par_chunks_mut(ho * wo * c)
            .zip(x.par_chunks(h * w * c))
            .for_each(|(y, x)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let y = &mut y[(oy * wo + ox) * c..][..c];
                        let mut taps = window(oy, ox, h, w);
                        // The window's centre is always inside the image.
                        let first = taps.next().expect("a window inside the image");
                        y.copy_from_slice(&x[first * c..][..c]);
                        for i in taps {
                            window_max(y, &x[i * c..][..c]);
                        }
                    }
                }
            });
        profile::add(Phase::Elementwise, t0);
        Ok((CpuStorage::F32(y), Shape::from((n, ho, wo, c))))
    }

    /// Each output's gradient goes to the first window position holding
    /// the maximum (found again here rather than stored by the forward
    /// pass, which inference runs alone).
    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let t0 = Instant::now();
        let (_, h, w, c, ho, wo) = pool_dims(x.shape())?;
        let dx = read(x, "maxpool backward", |x| {
            read(y, "maxpool backward", |y| {
                read(dy, "maxpool backward", |dy| {
                    // Every element is written: each image is zeroed, then
                    // routed to (while it is in cache).
                    let mut dx = super::output_vec(x.len());
                    dx.par_chunks_mut(h * w * c)
                        .zip(x.par_chunks(h * w * c))
                        .zip(y.par_chunks(ho * wo * c).zip(dy.par_chunks(ho * wo * c)))
                        .for_each(|((dx, x), (y, dy))| {
                            dx.fill(0.0);
                            route(dx, x, y, dy, (h, w, c, ho, wo));
                        });
                    Ok(dx)
                })
            })
        })?;
        profile::add(Phase::Elementwise, t0);
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// One image's max-pool backward: `dy` of each output to the first input
/// of its window equal to the output (a NaN maximum, equal to nothing, to
/// the window's first position). The search runs over all channels at
/// once (last position to first, so the first match wins), and so does
/// the update of each window position.
fn route(
    dx: &mut [f32],
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    (h, w, c, ho, wo): (usize, usize, usize, usize, usize),
) {
    let mut pos = vec![0u32; c];
    for oy in 0..ho {
        for ox in 0..wo {
            let o = (oy * wo + ox) * c;
            let (y, dy) = (&y[o..o + c], &dy[o..o + c]);
            let mut offs = [0usize; 9];
            let mut m = 0;
            for i in window(oy, ox, h, w) {
                offs[m] = i * c;
                m += 1;
            }
            pos.fill(0);
            for t in (0..m).rev() {
                let xt = &x[offs[t]..][..c];
                for ((p, &v), &yv) in pos.iter_mut().zip(xt).zip(y) {
                    *p = if v == yv { t as u32 } else { *p };
                }
            }
            // Whole pixels: each window position adds its channels' share
            // (dy where it holds the maximum, +0 elsewhere: no change).
            for (t, &off) in offs[..m].iter().enumerate() {
                let d = &mut dx[off..][..c];
                for ((d, &p), &g) in d.iter_mut().zip(&pos).zip(dy) {
                    *d += if p == t as u32 { g } else { 0.0 };
                }
            }
        }
    }
}

/// 3x3 stride-2 max pool with padding 1 (padding never wins) of an NHWC
/// tensor, with its backward pass.
pub fn maxpool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPoolOp)
}
