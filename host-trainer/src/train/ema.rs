//! An exponential moving average (EMA) of a model's variables (`train
//! --ema DECAY`): after every optimizer step each average moves towards the
//! variable, `avg = d · avg + (1 − d) · var`, with
//! `d = min(DECAY, (1 + i) / (10 + i))` at iteration `i`, so that the first
//! steps' random weights fade quickly. The BN running statistics are
//! averaged alike, so the averaged network is evaluated with statistics of
//! its own kind.
//!
//! The averaged weights are what a run with an EMA evaluates, exports and
//! ships; the raw weights keep training. Checkpoints hold both (`ema.*`
//! next to `model.*`), so a resumed run continues bit for bit.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;

use crate::train::Trainee;

/// Prefix of the averaged variables in a checkpoint.
pub const EMA_PREFIX: &str = "ema.";

/// The averages of a model's variables, in [`Trainee::named_vars`] order.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    avg: Vec<(String, Tensor)>,
}

/// Checks that `decay` is a usable EMA decay.
pub fn check_decay(decay: f64) -> Result<()> {
    ensure!(
        decay > 0.0 && decay < 1.0,
        "--ema {decay}: the decay per step must be strictly between 0 and 1 (e.g. 0.999)"
    );
    Ok(())
}

impl Ema {
    /// Averages that start at `t`'s current values.
    pub fn new(t: &Trainee, decay: f64) -> Result<Self> {
        check_decay(decay)?;
        let avg = t
            .named_vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, avg })
    }

    /// The averages saved in a checkpoint's `ema.*` tensors, one for each
    /// of `t`'s variables.
    pub fn restore(t: &Trainee, decay: f64, saved: &HashMap<String, Tensor>) -> Result<Self> {
        check_decay(decay)?;
        let avg = t
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                let key = format!("{EMA_PREFIX}{n}");
                let s = saved
                    .get(&key)
                    .with_context(|| format!("the checkpoint lacks the average `{key}`"))?;
                ensure!(
                    s.dims() == v.dims(),
                    "the average `{key}` has shape {:?}, the variable has {:?}",
                    s.dims(),
                    v.dims()
                );
                Ok((n, s.detach().copy()?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { decay, avg })
    }

    /// The decay applied after iteration `iteration` (0-based).
    pub fn decay_at(&self, iteration: usize) -> f64 {
        let i = iteration as f64;
        self.decay.min((1.0 + i) / (10.0 + i))
    }

    /// Moves every average towards `t`'s variable, after iteration
    /// `iteration`.
    pub fn update(&mut self, t: &Trainee, iteration: usize) -> Result<()> {
        let d = self.decay_at(iteration);
        for ((name, avg), (vname, var)) in self.avg.iter_mut().zip(t.named_vars()) {
            debug_assert_eq!(*name, vname);
            *avg = (avg.affine(d, 0.0)? + var.as_tensor().detach().affine(1.0 - d, 0.0)?)?;
        }
        Ok(())
    }

    /// Exchanges `t`'s variables and the averages: call it once to
    /// evaluate the averaged model, and again to go on training.
    pub fn swap(&mut self, t: &Trainee) -> Result<()> {
        for ((name, avg), (vname, var)) in self.avg.iter_mut().zip(t.named_vars()) {
            ensure!(
                *name == vname,
                "EMA variables out of step: {name} vs {vname}"
            );
            let raw = var.as_tensor().detach().copy()?;
            var.set(avg)?;
            *avg = raw;
        }
        Ok(())
    }

    /// `(checkpoint name, average)` of every variable.
    pub fn tensors(&self) -> impl Iterator<Item = (String, &Tensor)> {
        self.avg
            .iter()
            .map(|(n, t)| (format!("{EMA_PREFIX}{n}"), t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ArchConfig;
    use candle_core::Device;

    fn tiny() -> Trainee {
        let arch = ArchConfig {
            widths: vec![4, 8],
            blocks: vec![1, 1],
            maxpool: true,
            classes: 3,
        };
        Trainee::new(&arch, 1, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The warm-up formula and the update, by hand on every variable.
    #[test]
    fn update_by_hand() {
        let t = tiny();
        let mut ema = Ema::new(&t, 0.99).unwrap();
        assert_eq!(ema.decay_at(0), 0.1);
        assert_eq!(ema.decay_at(90), 91.0 / 100.0);
        assert_eq!(ema.decay_at(10_000), 0.99);
        let before: Vec<Vec<f32>> = ema.avg.iter().map(|(_, a)| values(a)).collect();
        for (_, v) in t.named_vars() {
            let shifted = (v.as_tensor() + 1.0).unwrap();
            v.set(&shifted).unwrap();
        }
        ema.update(&t, 0).unwrap();
        for (((_, avg), (_, var)), old) in ema.avg.iter().zip(t.named_vars()).zip(&before) {
            for ((a, v), o) in values(avg).iter().zip(values(var.as_tensor())).zip(old) {
                let want = 0.1 * f64::from(*o) + 0.9 * f64::from(v);
                assert!((f64::from(*a) - want).abs() < 1e-5, "{a} vs {want}");
            }
        }
    }

    /// Swapping twice gives back the raw weights; once puts the averages
    /// in the model; the checkpoint names carry the prefix.
    #[test]
    fn swap_exchanges_and_restore_round_trips() {
        let t = tiny();
        let mut ema = Ema::new(&t, 0.9).unwrap();
        for (_, v) in t.named_vars() {
            v.set(&(v.as_tensor() * 2.0).unwrap()).unwrap();
        }
        ema.update(&t, 100).unwrap();
        let raw: Vec<Vec<f32>> = t.named_vars().iter().map(|(_, v)| values(v)).collect();
        let avg: Vec<Vec<f32>> = ema.avg.iter().map(|(_, a)| values(a)).collect();
        ema.swap(&t).unwrap();
        let now: Vec<Vec<f32>> = t.named_vars().iter().map(|(_, v)| values(v)).collect();
        assert_eq!(now, avg);
        ema.swap(&t).unwrap();
        let back: Vec<Vec<f32>> = t.named_vars().iter().map(|(_, v)| values(v)).collect();
        assert_eq!(back, raw);
        assert_ne!(raw, avg);

        let saved: HashMap<String, Tensor> = ema.tensors().map(|(n, a)| (n, a.clone())).collect();
        assert!(saved.keys().all(|k| k.starts_with(EMA_PREFIX)));
        let back = Ema::restore(&t, 0.9, &saved).unwrap();
        let restored: Vec<Vec<f32>> = back.avg.iter().map(|(_, a)| values(a)).collect();
        assert_eq!(restored, avg);

        let mut missing = saved.clone();
        missing.remove("ema.fc.weight");
        let e = Ema::restore(&t, 0.9, &missing).unwrap_err().to_string();
        assert!(e.contains("ema.fc.weight"), "{e}");
        for bad in [0.0, 1.0, -0.5, f64::NAN] {
            assert!(Ema::new(&t, bad).is_err(), "{bad}");
        }
    }
}
