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
use candle_core::{Tensor, Var};

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
            let mut g = g.detach();
            if p.decay && weight_decay != 0.0 {
                g = (g + (p.var.as_tensor().detach() * weight_decay)?)?;
            }
            let d = if momentum != 0.0 {
                let buf = match &p.momentum {
                    None => g.clone(),
                    Some(b) => ((b * momentum)? + &g)?,
                }
                .detach();
                p.momentum = Some(buf.clone());
                if nesterov {
                    (g + (buf * momentum)?)?
                } else {
                    buf
                }
            } else {
                g
            };
            let next = (p.var.as_tensor().detach() - (d * lr)?)?;
            p.var
                .set(&next)
                .with_context(|| format!("updating {name}"))?;
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
}
