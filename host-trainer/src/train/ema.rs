//! Running averages of a model's variables during a run, by one of two
//! rules:
//!
//! - **EMA** (`train --ema DECAY`): after every optimizer step each average
//!   moves towards the variable, `avg = d · avg + (1 − d) · var`, with
//!   `d = min(DECAY, (1 + i) / (10 + i))` at iteration `i`, so that the
//!   first steps' random weights fade quickly.
//! - **SWA** (`train --swa-from E`): the plain mean of the variables at the
//!   end of epochs `E, E+1, …` (stochastic weight averaging), kept as
//!   `avg = k/(k+1) · avg + 1/(k+1) · var` after the `k+1`-th of them.
//!
//! The BN running statistics are averaged alike, so the averaged network is
//! evaluated with statistics of its own kind.
//!
//! Once an average exists it is what the run evaluates, exports and ships;
//! the raw weights keep training. Checkpoints hold both (`avg.*` next to
//! `model.*`), so a resumed run continues bit for bit.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;

use crate::checkpoint::saved_tensor;
use crate::train::Trainee;

/// Prefix of the averaged variables in a checkpoint.
pub const AVG_PREFIX: &str = "avg.";

/// How the average follows the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Exponential, after every step, with this decay.
    Ema(f64),
    /// The uniform mean of the weights at the end of every epoch from this
    /// one (1-based) on.
    SwaFrom(usize),
}

/// Checks that `decay` is a usable EMA decay.
pub fn check_decay(decay: f64) -> Result<()> {
    ensure!(
        decay > 0.0 && decay < 1.0,
        "--ema {decay}: the decay per step must be strictly between 0 and 1 (e.g. 0.999)"
    );
    Ok(())
}

/// The averages of a model's variables, in [`Trainee::named_vars`] order;
/// `None` until the rule has started (SWA before its first epoch).
#[derive(Debug)]
pub struct RunningAverage {
    rule: Rule,
    avg: Option<Vec<(String, Tensor)>>,
}

/// A copy of every variable of `t`.
fn snapshot(t: &Trainee) -> Result<Vec<(String, Tensor)>> {
    t.named_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().detach().copy()?)))
        .collect()
}

impl RunningAverage {
    /// A fresh average for a run starting at `t`'s values: an EMA starts
    /// from them, SWA at the end of its first epoch.
    pub fn new(t: &Trainee, rule: Rule) -> Result<Self> {
        let avg = match rule {
            Rule::Ema(decay) => {
                check_decay(decay)?;
                Some(snapshot(t)?)
            }
            Rule::SwaFrom(epoch) => {
                ensure!(epoch >= 1, "--swa-from counts epochs from 1");
                None
            }
        };
        Ok(Self { rule, avg })
    }

    /// The average saved in a checkpoint's `avg.*` tensors after
    /// `completed` epochs: one for each of `t`'s variables, or nothing for
    /// SWA that has not begun by then.
    pub fn restore(
        t: &Trainee,
        rule: Rule,
        saved: &HashMap<String, Tensor>,
        completed: usize,
    ) -> Result<Self> {
        let mut me = Self::new(t, rule)?;
        if matches!(rule, Rule::SwaFrom(from) if completed < from) {
            return Ok(me);
        }
        let avg = t
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                let s = saved_tensor(saved, &format!("{AVG_PREFIX}{n}"), v.dims())?;
                Ok((n, s.detach().copy()?))
            })
            .collect::<Result<_>>()?;
        me.avg = Some(avg);
        Ok(me)
    }

    /// Whether an average exists (the model to evaluate and export).
    pub fn started(&self) -> bool {
        self.avg.is_some()
    }

    /// The EMA decay applied after iteration `iteration` (0-based).
    fn decay_at(decay: f64, iteration: usize) -> f64 {
        let i = iteration as f64;
        decay.min((1.0 + i) / (10.0 + i))
    }

    /// `avg = d · avg + (1 − d) · var` for every variable.
    fn blend(&mut self, t: &Trainee, d: f64) -> Result<()> {
        let avg = self.avg.as_mut().context("no average to update")?;
        for ((name, avg), (vname, var)) in avg.iter_mut().zip(t.named_vars()) {
            ensure!(*name == vname, "average out of step: {name} vs {vname}");
            *avg = (avg.affine(d, 0.0)? + var.as_tensor().detach().affine(1.0 - d, 0.0)?)?;
        }
        Ok(())
    }

    /// After optimizer step `iteration` (0-based): the EMA update.
    pub fn after_step(&mut self, t: &Trainee, iteration: usize) -> Result<()> {
        match self.rule {
            Rule::Ema(decay) => self.blend(t, Self::decay_at(decay, iteration)),
            Rule::SwaFrom(_) => Ok(()),
        }
    }

    /// After epoch `epoch` (1-based) has ended: the SWA update.
    pub fn after_epoch(&mut self, t: &Trainee, epoch: usize) -> Result<()> {
        let Rule::SwaFrom(from) = self.rule else {
            return Ok(());
        };
        if epoch < from {
            return Ok(());
        }
        // `k` epochs are in the average already.
        let k = (epoch - from) as f64;
        if self.avg.is_none() {
            self.avg = Some(snapshot(t)?);
            return Ok(());
        }
        self.blend(t, k / (k + 1.0))
    }

    /// Exchanges `t`'s variables and the averages (nothing before an
    /// average exists): call it once to evaluate the averaged model, and
    /// again to go on training.
    pub fn swap(&mut self, t: &Trainee) -> Result<()> {
        let Some(avg) = self.avg.as_mut() else {
            return Ok(());
        };
        for ((name, avg), (vname, var)) in avg.iter_mut().zip(t.named_vars()) {
            ensure!(*name == vname, "average out of step: {name} vs {vname}");
            let raw = var.as_tensor().detach().copy()?;
            var.set(avg)?;
            *avg = raw;
        }
        Ok(())
    }

    /// `(checkpoint name, average)` of every variable (none before the
    /// average exists).
    pub fn tensors(&self) -> impl Iterator<Item = (String, &Tensor)> {
        self.avg
            .iter()
            .flatten()
            .map(|(n, t)| (format!("{AVG_PREFIX}{n}"), t))
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

    fn vars(t: &Trainee) -> Vec<Vec<f32>> {
        t.named_vars().iter().map(|(_, v)| values(v)).collect()
    }

    fn avgs(a: &RunningAverage) -> Vec<Vec<f32>> {
        a.avg.iter().flatten().map(|(_, t)| values(t)).collect()
    }

    /// Adds `x` to every variable of `t`.
    fn shift(t: &Trainee, x: f64) {
        for (_, v) in t.named_vars() {
            v.set(&(v.as_tensor() + x).unwrap()).unwrap();
        }
    }

    /// The warm-up formula and the update, by hand on every variable.
    #[test]
    fn ema_by_hand() {
        assert_eq!(RunningAverage::decay_at(0.99, 0), 0.1);
        assert_eq!(RunningAverage::decay_at(0.99, 90), 91.0 / 100.0);
        assert_eq!(RunningAverage::decay_at(0.99, 10_000), 0.99);
        let t = tiny();
        let mut ema = RunningAverage::new(&t, Rule::Ema(0.99)).unwrap();
        let before = avgs(&ema);
        shift(&t, 1.0);
        ema.after_epoch(&t, 1).unwrap();
        assert_eq!(avgs(&ema), before, "an EMA ignores epoch ends");
        ema.after_step(&t, 0).unwrap();
        for ((a, v), o) in avgs(&ema).iter().zip(vars(&t)).zip(&before) {
            for ((a, v), o) in a.iter().zip(v).zip(o) {
                let want = 0.1 * f64::from(*o) + 0.9 * f64::from(v);
                assert!((f64::from(*a) - want).abs() < 1e-5, "{a} vs {want}");
            }
        }
    }

    /// SWA from epoch 2: nothing at epoch 1, then the mean of the weights
    /// at the ends of epochs 2, 3 and 4 (which differ by 3 and 6).
    #[test]
    fn swa_is_the_mean_of_epoch_ends() {
        let t = tiny();
        let mut swa = RunningAverage::new(&t, Rule::SwaFrom(2)).unwrap();
        swa.after_step(&t, 0).unwrap();
        swa.after_epoch(&t, 1).unwrap();
        assert!(!swa.started() && swa.tensors().count() == 0);
        shift(&t, 1.0);
        let at2 = vars(&t);
        swa.after_epoch(&t, 2).unwrap();
        assert_eq!(avgs(&swa), at2);
        shift(&t, 3.0);
        swa.after_epoch(&t, 3).unwrap();
        shift(&t, 3.0);
        swa.after_epoch(&t, 4).unwrap();
        for (a, v2) in avgs(&swa).iter().zip(&at2) {
            for (a, v2) in a.iter().zip(v2) {
                let want = f64::from(*v2) + 3.0;
                assert!((f64::from(*a) - want).abs() < 1e-5, "{a} vs {want}");
            }
        }
        assert!(RunningAverage::new(&t, Rule::SwaFrom(0)).is_err());
    }

    /// Swapping twice gives back the raw weights; once puts the averages
    /// in the model; the checkpoint names carry the prefix and restore.
    #[test]
    fn swap_exchanges_and_restore_round_trips() {
        let t = tiny();
        let mut ema = RunningAverage::new(&t, Rule::Ema(0.9)).unwrap();
        shift(&t, 2.0);
        ema.after_step(&t, 100).unwrap();
        let (raw, avg) = (vars(&t), avgs(&ema));
        ema.swap(&t).unwrap();
        assert_eq!(vars(&t), avg);
        ema.swap(&t).unwrap();
        assert_eq!(vars(&t), raw);
        assert_ne!(raw, avg);

        let saved: HashMap<String, Tensor> = ema.tensors().map(|(n, a)| (n, a.clone())).collect();
        assert!(saved.keys().all(|k| k.starts_with(AVG_PREFIX)));
        let back = RunningAverage::restore(&t, Rule::Ema(0.9), &saved, 1).unwrap();
        assert_eq!(avgs(&back), avg);
        let swa = RunningAverage::restore(&t, Rule::SwaFrom(5), &saved, 5).unwrap();
        assert_eq!(avgs(&swa), avg);
        let fresh = RunningAverage::restore(&t, Rule::SwaFrom(5), &HashMap::new(), 4).unwrap();
        assert!(!fresh.started());

        let mut missing = saved.clone();
        missing.remove("avg.fc.weight");
        for rule in [Rule::Ema(0.9), Rule::SwaFrom(5)] {
            let e = RunningAverage::restore(&t, rule, &missing, 6)
                .unwrap_err()
                .to_string();
            assert!(e.contains("avg.fc.weight"), "{e}");
        }
        assert!(RunningAverage::restore(&t, Rule::Ema(0.9), &HashMap::new(), 0).is_err());
        assert!(RunningAverage::restore(&t, Rule::SwaFrom(5), &HashMap::new(), 5).is_err());
        for bad in [0.0, 1.0, -0.5, f64::NAN] {
            assert!(RunningAverage::new(&t, Rule::Ema(bad)).is_err(), "{bad}");
        }
    }
}
