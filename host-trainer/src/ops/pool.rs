//! 3x3 stride-2 max pool with padding 1 on NHWC tensors, with a backward
//! pass that sends each output's gradient to the first maximum of its
//! window (row-major order, as PyTorch).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{profile, read, slice, tensor, Phase};

#[derive(Debug, Clone, Default)]
struct MaxPoolOp {
    /// Window position (0..9, row-major) of each output's maximum.
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

/// Takes `v` where it is larger than the running maximum `y` (ties keep
/// the earlier position), recording position `t`.
#[inline(always)]
fn window_max(y: &mut [f32], arg: &mut [u8], v: &[f32], t: u8) {
    for ((y, a), &v) in y.iter_mut().zip(arg.iter_mut()).zip(v) {
        let take = v > *y;
        *y = if take { v } else { *y };
        *a = if take { t } else { *a };
    }
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "fast-maxpool-3x3-s2-p1-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t0 = Instant::now();
        let (n, h, w, c, ho, wo) = pool_dims(l.shape())?;
        let x = slice(s, l, "maxpool")?;
        let mut y = vec![0f32; n * ho * wo * c];
        let mut arg = vec![0u8; y.len()];
        y.par_chunks_mut(ho * wo * c)
            .zip(arg.par_chunks_mut(ho * wo * c))
            .zip(x.par_chunks(h * w * c))
            .for_each(|((y, arg), x)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let o = (oy * wo + ox) * c;
                        let (y, arg) = (&mut y[o..o + c], &mut arg[o..o + c]);
                        let mut taps = (0..9).filter_map(|t| Some((t, tap(t, oy, ox, h, w)?)));
                        // The window's centre is always inside the image.
                        let (t0, i0) = taps.next().expect("a window inside the image");
                        y.copy_from_slice(&x[i0 * c..][..c]);
                        arg.fill(t0 as u8);
                        for (t, i) in taps {
                            window_max(y, arg, &x[i * c..][..c], t as u8);
                        }
                    }
                }
            });
        *self.argmax.lock().unwrap_or_else(|e| e.into_inner()) = arg;
        profile::add(Phase::Elementwise, t0);
        Ok((CpuStorage::F32(y), Shape::from((n, ho, wo, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let t0 = Instant::now();
        let (_, h, w, c, ho, wo) = pool_dims(x.shape())?;
        let arg = std::mem::take(&mut *self.argmax.lock().unwrap_or_else(|e| e.into_inner()));
        if arg.len() != dy.elem_count() {
            bail!("maxpool: backward pass without a forward pass (or run twice)")
        }
        let dx = read(dy, "maxpool backward", |dy| {
            let mut dx = vec![0f32; x.elem_count()];
            dx.par_chunks_mut(h * w * c)
                .zip(dy.par_chunks(ho * wo * c).zip(arg.par_chunks(ho * wo * c)))
                .for_each(|(dx, (dy, arg))| {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let o = (oy * wo + ox) * c;
                            for ch in 0..c {
                                let t = arg[o + ch] as usize;
                                if let Some(i) = tap(t, oy, ox, h, w) {
                                    dx[i * c + ch] += dy[o + ch];
                                }
                            }
                        }
                    }
                });
            Ok(dx)
        })?;
        profile::add(Phase::Elementwise, t0);
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// 3x3 stride-2 max pool with padding 1 (padding never wins) of an NHWC
/// tensor, with its backward pass.
pub fn maxpool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPoolOp::default())
}
