//! SGD with momentum, Nesterov and decoupled-from-BN weight decay
//! (PyTorch's `torch.optim.SGD` update rule).
//!
//! For each parameter `p` with gradient `g`:
//!
//! ```text
//! g   = g + weight_decay * p          (only for decayed parameters)
//! buf = g                              (first step)
//! buf = momentum * buf + g             (later steps)
//! d   = g + momentum * buf  if nesterov, else buf
//! p   = p - lr * d
//! ```
//!
//! Momentum buffers are plain detached tensors: keeping graph-carrying
//! gradients would chain every step's graph together and leak memory.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

/// Optimizer hyper-parameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    /// Momentum factor, 0 for plain SGD.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay for conv/FC weights.
    pub weight_decay: f64,
}

/// One optimized variable.
#[derive(Debug)]
struct Param {
    var: Var,
    decay: bool,
    momentum: Option<Tensor>,
}

/// SGD over named variables.
#[derive(Debug)]
pub struct Sgd {
    cfg: SgdConfig,
    params: BTreeMap<String, Param>,
}

/// One update of `p` through candle tensor ops (any device; on the CPU the
/// first step, which creates the momentum buffer).
fn step_tensors(cfg: SgdConfig, p: &mut Param, g: &Tensor, lr: f64) -> Result<()> {
    let mut g = g.detach();
    if p.decay && cfg.weight_decay != 0.0 {
        g = (g + (p.var.as_tensor().detach() * cfg.weight_decay)?)?;
    }
    let d = if cfg.momentum != 0.0 {
        let buf = match &p.momentum {
            // A copy: the buffer is later updated in place, and `g` may
            // share its storage with the gradient store.
            None => g.copy()?,
            Some(b) => ((b * cfg.momentum)? + &g)?,
        }
        .detach();
        p.momentum = Some(buf.clone());
        if cfg.nesterov {
            (g + (buf * cfg.momentum)?)?
        } else {
            buf
        }
    } else {
        g
    };
    let next = (p.var.as_tensor().detach() - (d * lr)?)?;
    p.var.set(&next)?;
    Ok(())
}

/// The update of [`step_tensors`] after the first step, fused into two
/// in-place passes on the CPU (the momentum buffer, then the weights): no
/// temporaries and both cores, with the tensor path's arithmetic in the
/// same order, so both give the same bits (`fused_matches_tensor_ops`).
#[derive(Debug, Clone, Copy)]
struct FusedSgd {
    momentum: f32,
    nesterov: bool,
    /// 0 for parameters without decay.
    weight_decay: f32,
    lr: f32,
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

impl FusedSgd {
    /// Whether the fused path applies: f32 CPU tensors of one shape.
    fn applies(&self, p: &Tensor, g: &Tensor, buf: &Tensor) -> bool {
        [p, g, buf].iter().all(|t| {
            t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.dims() == p.dims()
        })
    }

    /// `g + p * weight_decay`, as candle computes `g + (p * wd)`
    /// (an affine with a zero offset).
    #[inline]
    fn decayed(&self, g: f32, p: f32) -> f32 {
        if self.weight_decay == 0.0 {
            g
        } else {
            g + (p * self.weight_decay + 0.0)
        }
    }

    /// Updates `buf` then `p` in place from the gradient `g`.
    fn step(&self, p: &Tensor, g: &Tensor, buf: &Tensor) -> candle_core::Result<()> {
        let g = g.contiguous()?;
        buf.inplace_op3(&g, p, &MomentumPass(*self))?;
        p.inplace_op3(&g, buf, &WeightPass(*self))
    }
}

/// `buf = buf * momentum + (g + p * weight_decay)`.
struct MomentumPass(FusedSgd);

/// `p = p - lr * d`, `d = g' + buf * momentum` (Nesterov) or `buf`.
struct WeightPass(FusedSgd);

/// The contiguous f32 data of a tensor's storage.
fn data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("sgd: expects contiguous f32 tensors"),
    }
}

/// The contiguous f32 data of a tensor's storage, to update in place.
fn data_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("sgd: expects contiguous f32 tensors"),
    }
}

/// `f(dst[i], a[i], b[i])` for every element, in parallel chunks.
fn zip_update(
    (dst, dst_l): (&mut CpuStorage, &Layout),
    (a, al): (&CpuStorage, &Layout),
    (b, bl): (&CpuStorage, &Layout),
    f: impl Fn(&mut f32, f32, f32) + Sync,
) -> candle_core::Result<()> {
    let (dst, a, b) = (data_mut(dst, dst_l)?, data(a, al)?, data(b, bl)?);
    dst.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(dst, (a, b))| {
            for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
                f(d, a, b);
            }
        });
    Ok(())
}

impl InplaceOp3 for MomentumPass {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        let o = self.0;
        zip_update((dst, dst_l), (g, gl), (p, pl), |b, g, p| {
            *b = (*b * o.momentum + 0.0) + o.decayed(g, p);
        })
    }
}

impl InplaceOp3 for WeightPass {
    fn name(&self) -> &'static str {
        "sgd-weights"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        buf: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let o = self.0;
        zip_update((dst, dst_l), (g, gl), (buf, bl), |p, g, b| {
            let d = if o.nesterov {
                o.decayed(g, *p) + (b * o.momentum + 0.0)
            } else {
                b
            };
            *p -= d * o.lr + 0.0;
        })
    }
}

/// Whether weight decay applies to a variable: conv and FC weights only,
/// never BN scale/shift or biases (running statistics are not optimized at
/// all).
pub fn decays(name: &str) -> bool {
    name.ends_with(".weight") && !name.contains(".bn")
}

/// Whether a variable is trained by gradient (BN running statistics are not).
pub fn trainable(name: &str) -> bool {
    !name.ends_with("running_mean") && !name.ends_with("running_var")
}

impl Sgd {
    /// An optimizer over the trainable entries of `vars`.
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, cfg: SgdConfig) -> Self {
        let params = vars
            .into_iter()
            .filter(|(n, _)| trainable(n))
            .map(|(n, var)| {
                let decay = decays(&n);
                (
                    n,
                    Param {
                        var,
                        decay,
                        momentum: None,
                    },
                )
            })
            .collect();
        Self { cfg, params }
    }

    /// Applies one update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_where(grads, lr, |_| true)
    }

    /// [`step`](Self::step) for the parameters whose name passes `train`
    /// only; the others (and their momentum) are left as they are.
    pub fn step_where(
        &mut self,
        grads: &GradStore,
        lr: f64,
        train: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let SgdConfig {
            momentum,
            nesterov,
            weight_decay,
        } = self.cfg;
        for (name, p) in self.params.iter_mut() {
            if !train(name) {
                continue;
            }
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let fused = FusedSgd {
                momentum: momentum as f32,
                nesterov,
                weight_decay: if p.decay { weight_decay as f32 } else { 0.0 },
                lr: lr as f32,
            };
            match &p.momentum {
                Some(buf) if momentum != 0.0 && fused.applies(p.var.as_tensor(), g, buf) => {
                    fused
                        .step(p.var.as_tensor(), g, buf)
                        .with_context(|| format!("updating {name}"))?;
                }
                _ => {
                    step_tensors(self.cfg, p, g, lr).with_context(|| format!("updating {name}"))?
                }
            }
        }
        Ok(())
    }

    /// Momentum buffers by parameter name, for checkpoints.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params
            .iter()
            .filter_map(|(n, p)| p.momentum.as_ref().map(|m| (n.as_str(), m)))
    }

    /// Restores a momentum buffer saved by [`state`](Self::state).
    pub fn set_state(&mut self, name: &str, buf: Tensor) -> Result<()> {
        let p = self
            .params
            .get_mut(name)
            .with_context(|| format!("checkpoint has momentum for unknown parameter `{name}`"))?;
        anyhow::ensure!(
            buf.dims() == p.var.dims(),
            "momentum for `{name}` has shape {:?}, the parameter has {:?}",
            buf.dims(),
            p.var.dims()
        );
        p.momentum = Some(buf.detach());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar_step(cfg: SgdConfig, p0: f32, grads: &[f32], lr: f64, name: &str) -> f32 {
        let var = Var::new(&[p0], &Device::Cpu).unwrap();
        let mut opt = Sgd::new([(name.to_string(), var.clone())], cfg);
        for &g in grads {
            // loss = g * p has gradient g.
            let loss = (var.as_tensor() * g as f64).unwrap().sum_all().unwrap();
            let gs = loss.backward().unwrap();
            opt.step(&gs, lr).unwrap();
        }
        var.as_tensor().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn plain_sgd() {
        let cfg = SgdConfig {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        // 1 - 0.1*2 - 0.1*(-1) = 0.9
        assert!((scalar_step(cfg, 1.0, &[2.0, -1.0], 0.1, "fc.weight") - 0.9).abs() < 1e-6);
    }

    #[test]
    fn momentum_by_hand() {
        let cfg = SgdConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        };
        // step1: buf=1, p=1-0.1=0.9; step2: buf=0.9*1+1=1.9, p=0.9-0.19=0.71
        assert!((scalar_step(cfg, 1.0, &[1.0, 1.0], 0.1, "fc.weight") - 0.71).abs() < 1e-6);
    }

    #[test]
    fn nesterov_and_decay_by_hand() {
        let cfg = SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        };
        // step1: g=1+0.1*2=1.2, buf=1.2, d=1.2+0.9*1.2=2.28, p=2-0.228=1.772
        // step2: g=1+0.1772=1.1772, buf=0.9*1.2+1.1772=2.2572, d=1.1772+2.03148=3.20868, p=1.772-0.320868=1.451132
        let p = scalar_step(cfg, 2.0, &[1.0, 1.0], 0.1, "layer1.0.conv1.weight");
        assert!((p - 1.451132).abs() < 1e-5, "{p}");
        // BN scale: no decay. step1: d=1+0.9=1.9, p=2-0.19=1.81
        let p = scalar_step(cfg, 2.0, &[1.0], 0.1, "layer1.0.bn1.weight");
        assert!((p - 1.81).abs() < 1e-6, "{p}");
    }

    #[test]
    fn running_stats_are_not_optimized() {
        assert!(!trainable("stem.bn.running_mean"));
        assert!(!trainable("layer2.0.shortcut.bn.running_var"));
        assert!(trainable("stem.bn.weight"));
        assert!(decays("layer2.0.shortcut.conv.weight"));
        assert!(!decays("fc.bias"));
        assert!(!decays("stem.bn.weight"));
    }
    /// The fused CPU update gives the same bits as the tensor ops, over
    /// several steps, with and without decay and Nesterov.
    #[test]
    fn fused_matches_tensor_ops() {
        let dev = Device::Cpu;
        for (nesterov, name) in [
            (true, "a.weight"),
            (false, "a.weight"),
            (true, "a.bn.weight"),
        ] {
            let cfg = SgdConfig {
                momentum: 0.9,
                nesterov,
                weight_decay: 5e-4,
            };
            let p0 = Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap();
            let fused = Var::from_tensor(&p0.copy().unwrap()).unwrap();
            let mut opt = Sgd::new([(name.to_string(), fused.clone())], cfg);
            let mut plain = Param {
                var: Var::from_tensor(&p0.copy().unwrap()).unwrap(),
                decay: decays(name),
                momentum: None,
            };
            for step in 0..4 {
                let g = Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap();
                let loss = (fused.as_tensor() * &g).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                let lr = 0.1 / (step + 1) as f64;
                opt.step(&grads, lr).unwrap();
                step_tensors(cfg, &mut plain, &g, lr).unwrap();
                let a = fused
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = plain
                    .var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name} nesterov={nesterov}: step {step} differs");
                assert_ne!(a, p0.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
    }
}
