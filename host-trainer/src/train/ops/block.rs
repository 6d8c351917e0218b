//! A whole residual block in training mode as one candle op:
//! `relu(BN₂(conv₂(relu(BN₁(conv₁(x))))) + shortcut(x))`, the shortcut the
//! identity or BN(conv 1x1 stride s). The backward pass runs inside the
//! op, so the block's intermediate gradients never go through candle's
//! gradient store (which adds every gradient into a freshly zeroed tensor),
//! and the two gradients of `x` are added once.
//!
//! Arguments: `x` (N, H, W, C), the conv weights flattened and concatenated
//! (`w₁ | w₂ | w_s`), and the BN parameters concatenated (`γ₁ β₁ γ₂ β₂ γ_s
//! β_s`). The products and BN passes are those of `conv.rs`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::backward::{bn_backward, conv_backward};
use super::conv::{affine, train_bn, BnStats, ConvBnOp, Geom, Saved};
use super::{profile, read, slice, tensor, Phase};

/// Shapes of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Stride of the first conv and of the shortcut.
    pub stride: usize,
    /// Whether the shortcut is a 1x1 conv + BN (else the identity).
    pub projection: bool,
}

impl BlockSpec {
    fn weight_lens(&self) -> [usize; 3] {
        let (c, o) = (self.cin, self.cout);
        [
            o * c * 9,
            o * o * 9,
            if self.projection { o * c } else { 0 },
        ]
    }
    fn bn_lens(&self) -> [usize; 3] {
        [
            2 * self.cout,
            2 * self.cout,
            if self.projection { 2 * self.cout } else { 0 },
        ]
    }
}

/// One conv + BN of the block: its geometry and what its backward needs.
#[derive(Debug)]
struct Layer {
    g: Geom,
    saved: Saved,
}

#[derive(Debug, Default)]
struct State {
    layers: Vec<Layer>,
    /// The first conv's output after BN and ReLU (the second conv's input).
    y1: Vec<f32>,
}

#[derive(Debug, Clone)]
struct BlockOp {
    spec: BlockSpec,
    eps: f32,
    state: Arc<Mutex<State>>,
    stats: Arc<Mutex<Vec<BnStats>>>,
}

/// Splits `v` into consecutive parts of the given lengths.
fn split<'a>(v: &'a [f32], lens: &[usize]) -> Vec<&'a [f32]> {
    let mut rest = v;
    lens.iter()
        .map(|&n| {
            let (a, b) = rest.split_at(n);
            rest = b;
            a
        })
        .collect()
}

/// Conv + BN statistics of one layer: (layer state, batch statistics).
fn conv_bn(g: Geom, x: &[f32], w: &[f32], gb: &[f32], eps: f32) -> (Layer, BnStats) {
    let t0 = Instant::now();
    let (z, moments) = ConvBnOp::train_conv(g.stride, g.pad).forward(&g, x, w, gb, None);
    profile::add(Phase::Conv, t0);
    let t0 = Instant::now();
    let (saved, st) = train_bn(z, &moments, &g, gb, eps);
    profile::add(Phase::Bn, t0);
    (Layer { g, saved }, st)
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "fast-residual-block-nhwc"
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
        let sp = self.spec;
        let (x, wcat, gbcat) = (
            slice(s1, l1, "block")?,
            slice(s2, l2, "block")?,
            slice(s3, l3, "block")?,
        );
        let (wl, bl) = (sp.weight_lens(), sp.bn_lens());
        if wcat.len() != wl.iter().sum::<usize>() || gbcat.len() != bl.iter().sum::<usize>() {
            bail!("block: parameters do not fit {sp:?}")
        }
        let (w, gb) = (split(wcat, &wl), split(gbcat, &bl));
        let (c, o, s) = (sp.cin, sp.cout, sp.stride);
        let g1 = Geom::new(l1.shape(), &Shape::from((o, c, 3, 3)), s, 1)?;
        let (l1s, st1) = conv_bn(g1, x, w[0], gb[0], self.eps);
        let t0 = Instant::now();
        let mut y1 = super::output_vec(l1s.saved.z.len()); // written by `affine`
        affine(&l1s.saved.z, &l1s.saved.a, &l1s.saved.b, true, &mut y1);
        profile::add(Phase::Bn, t0);
        let out_shape = Shape::from((g1.n, g1.ho, g1.wo, o));
        let g2 = Geom::new(&out_shape, &Shape::from((o, o, 3, 3)), 1, 1)?;
        let (l2s, st2) = conv_bn(g2, &y1, w[1], gb[1], self.eps);
        let mut layers = vec![l1s, l2s];
        let mut stats = vec![st1, st2];
        if sp.projection {
            let gs = Geom::new(l1.shape(), &Shape::from((o, c, 1, 1)), s, 0)?;
            let (ls, sts) = conv_bn(gs, x, w[2], gb[2], self.eps);
            layers.push(ls);
            stats.push(sts);
        } else if c != o || s != 1 {
            bail!("block: an identity shortcut needs the same shape in and out ({sp:?})")
        }
        let t0 = Instant::now();
        let out = residual_out(&layers, x, o);
        profile::add(Phase::Elementwise, t0);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = State { layers, y1 };
        Ok((CpuStorage::F32(out), out_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wcat: &Tensor,
        gbcat: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let st = std::mem::take(&mut *self.state.lock().unwrap_or_else(|e| e.into_inner()));
        if st.layers.len() < 2 || st.layers[1].saved.z.len() != out.elem_count() {
            bail!("block: backward pass without a forward pass (or run twice)")
        }
        let need_dx = x.track_op();
        let sp = self.spec;
        let (dx, dw, dgb) = read(x, "block backward", |x| {
            read(wcat, "block backward", |wcat| {
                read(out, "block backward", |out| {
                    read(dout, "block backward", |dout| {
                        let w = split(wcat, &sp.weight_lens());
                        Ok(block_backward(&st, x, &w, out, dout, need_dx))
                    })
                })
            })
        })?;
        let dx = if need_dx {
            Some(tensor(dx, x.shape())?)
        } else {
            None
        };
        Ok((
            dx,
            Some(tensor(dw, wcat.shape())?),
            Some(tensor(dgb, gbcat.shape())?),
        ))
    }
}

/// `relu(BN₂(z₂) + shortcut)`, the shortcut `BN_s(z_s)` or `x`.
fn residual_out(layers: &[Layer], x: &[f32], o: usize) -> Vec<f32> {
    let s2 = &layers[1].saved;
    let (a2, b2) = (&s2.a[..o], &s2.b[..o]);
    let mut out = super::output_vec(s2.z.len()); // every element written below
    let rows = 64 * o;
    out.par_chunks_mut(rows).enumerate().for_each(|(i, out)| {
        let r = i * rows..i * rows + out.len();
        let z2 = &s2.z[r.clone()];
        match layers.get(2) {
            Some(l) => {
                let (zs, a_s, b_s) = (&l.saved.z[r], &l.saved.a[..o], &l.saved.b[..o]);
                for ((out, z2), zs) in out
                    .chunks_exact_mut(o)
                    .zip(z2.chunks_exact(o))
                    .zip(zs.chunks_exact(o))
                {
                    for ch in 0..o {
                        let short = zs[ch] * a_s[ch] + b_s[ch];
                        out[ch] = (z2[ch] * a2[ch] + b2[ch] + short).max(0.0);
                    }
                }
            }
            None => {
                let xs = &x[r];
                for ((out, z2), xs) in out
                    .chunks_exact_mut(o)
                    .zip(z2.chunks_exact(o))
                    .zip(xs.chunks_exact(o))
                {
                    for ch in 0..o {
                        out[ch] = (z2[ch] * a2[ch] + b2[ch] + xs[ch]).max(0.0);
                    }
                }
            }
        }
    });
    out
}

/// Gradients of `x`, of the concatenated weights and of the concatenated
/// BN parameters.
fn block_backward(
    st: &State,
    x: &[f32],
    w: &[&[f32]],
    out: &[f32],
    dout: &[f32],
    need_dx: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // Through the final ReLU: the gradient of both branches.
    let t0 = Instant::now();
    let g = super::relu_backward(out, dout);
    profile::add(Phase::Elementwise, t0);
    let (l1, l2) = (&st.layers[0], &st.layers[1]);
    let (dy1, dw2, dgb2) = layer_backward(l2, &st.y1, w[1], &g, (false, true), None);
    // The shortcut's input gradient first: the first conv's input-gradient
    // pass adds it (an epilogue, not another pass over the activation).
    let short = st
        .layers
        .get(2)
        .map(|ls| layer_backward(ls, x, w[2], &g, (false, need_dx), None));
    let dshort = short.as_ref().map_or(&g[..], |s| &s.0[..]);
    let (dx, dw1, dgb1) = layer_backward(l1, x, w[0], &dy1, (true, need_dx), Some(dshort));
    let mut dw = [dw1, dw2].concat();
    let mut dgb = [dgb1, dgb2].concat();
    if let Some((_, dws, dgbs)) = short {
        dw.extend(dws);
        dgb.extend(dgbs);
    }
    (dx, dw, dgb)
}

/// One conv + BN (+ ReLU) layer's backward: (input gradient plus
/// `dx_res`, weight gradient, (dγ, dβ)).
fn layer_backward(
    l: &Layer,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (relu, need_dx): (bool, bool),
    dx_res: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t0 = Instant::now();
    let bn = bn_backward(&l.saved, dy, &l.g, relu);
    profile::add(Phase::Bn, t0);
    let t0 = Instant::now();
    let (dx, dw) = conv_backward(&l.g, x, w, dy, &l.saved, &bn, relu, need_dx, dx_res);
    profile::add(Phase::Conv, t0);
    let dgb = bn.dgamma.iter().chain(&bn.dbeta).copied().collect();
    (dx, dw, dgb)
}

/// A residual block in training mode (see the module docs): the output and
/// the batch statistics of its BNs (first conv, second conv, shortcut).
pub fn block_train(
    x: &Tensor,
    wcat: &Tensor,
    gbcat: &Tensor,
    spec: BlockSpec,
    eps: f64,
) -> Result<(Tensor, Vec<BnStats>)> {
    let stats = Arc::new(Mutex::new(Vec::new()));
    let op = BlockOp {
        spec,
        eps: eps as f32,
        state: Arc::default(),
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&wcat.contiguous()?, &gbcat.contiguous()?, op)?;
    let s = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((y, s))
}
