//! Knowledge distillation from fixed teacher models (`train --distill`).
//!
//! The student's loss is `(1 − w)·CE + w·T²·KL(p_teacher ‖ p_student)`,
//! both distributions softened by the temperature `T` (Hinton et al.,
//! 2015). The teachers' distribution is the mean of their softmax outputs.
//!
//! With camera augmentations the teachers see the **clean** view of each
//! image (the same crop and flip, without the camera's zoom, exposure,
//! blur, noise or RGB565), while the student sees the camera view: the
//! student learns to give a degraded frame the prediction a good model
//! gives the clean image (a consistency target, as in AugMix), instead of
//! a one-hot label that says nothing of how much of the image is left.
//!
//! Teachers are any Mini-ResNet checkpoints (their averaged weights if they
//! kept an average) with the student's classes; their architecture may
//! differ. They only run forward, in inference mode, and take no gradient.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{load_checkpoint, model_from_checkpoint};
use crate::train::Trainee;

/// Distillation settings of a run (stored in its configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The teachers' checkpoints.
    pub teachers: Vec<PathBuf>,
    /// Weight `w` of the distillation term (the label term gets `1 − w`).
    pub weight: f64,
    /// Softening temperature `T`.
    pub temperature: f64,
}

impl DistillConfig {
    /// Checks the weight and temperature.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.teachers.is_empty(),
            "--distill needs at least one teacher checkpoint"
        );
        ensure!(
            (0.0..=1.0).contains(&self.weight),
            "--distill-weight must be within 0..=1 (got {})",
            self.weight
        );
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "--distill-temperature must be positive (got {})",
            self.temperature
        );
        Ok(())
    }
}

/// The loaded teachers.
#[derive(Debug)]
pub struct Teachers {
    models: Vec<Trainee>,
    temperature: f64,
}

impl Teachers {
    /// Loads every teacher of `cfg`; each must predict `classes` classes.
    pub fn load(cfg: &DistillConfig, classes: usize, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let models = cfg
            .teachers
            .iter()
            .map(|p| load_teacher(p, classes, device))
            .collect::<Result<_>>()?;
        Ok(Self {
            models,
            temperature: cfg.temperature,
        })
    }

    /// The teachers' mean softened distribution over the classes of the
    /// images `x`, `[n, classes]`, detached from any gradient.
    pub fn soft_targets(&self, x: &Tensor) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for t in &self.models {
            let logits = t.model.forward_t(x, false)?.detach();
            let p = candle_nn::ops::softmax(&(logits / self.temperature)?, D::Minus1)?;
            sum = Some(match sum {
                None => p,
                Some(s) => (s + p)?,
            });
        }
        let sum = sum.expect("at least one teacher (validated)");
        Ok((sum / self.models.len() as f64)?.detach())
    }
}

fn load_teacher(path: &Path, classes: usize, device: &Device) -> Result<Trainee> {
    let ck = load_checkpoint(path, device)
        .with_context(|| format!("--distill: cannot load the teacher {}", path.display()))?;
    let have = ck.meta.config.arch.classes;
    ensure!(
        have == classes,
        "--distill: the teacher {} predicts {have} classes, the data set has {classes}",
        path.display()
    );
    model_from_checkpoint(&ck, device)
        .with_context(|| format!("--distill: the teacher {}", path.display()))
}

/// `T²·KL(targets ‖ softmax(logits / T))`, averaged over the batch.
/// `targets` are probabilities (rows summing to 1).
pub fn distill_loss(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let logq = candle_nn::ops::log_softmax(&(logits / temperature)?, D::Minus1)?;
    // 0·log 0 = 0: the clamp keeps a vanished probability from making NaN.
    let logp = targets.clamp(1e-12f32, 1.0f32)?.log()?;
    let kl = (targets * (logp - logq)?)?.sum(D::Minus1)?.mean_all()?;
    Ok((kl * (temperature * temperature))?)
}

/// The student's loss: `(1 − w)·label_loss + w·distill_loss`.
pub fn mixed_loss(label_loss: &Tensor, distill: &Tensor, weight: f64) -> Result<Tensor> {
    Ok(((label_loss * (1.0 - weight))? + (distill * weight)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], rows: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (rows, v.len() / rows), &Device::Cpu).unwrap()
    }

    /// KL computed by hand in f64.
    fn kl_ref(logits: &[f32], p: &[f32], k: usize, temp: f64) -> f64 {
        let rows = logits.len() / k;
        let mut total = 0.0;
        for r in 0..rows {
            let z: Vec<f64> = logits[r * k..(r + 1) * k]
                .iter()
                .map(|&v| v as f64 / temp)
                .collect();
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            for c in 0..k {
                let pc = p[r * k + c] as f64;
                if pc > 0.0 {
                    total += pc * (pc.ln() - (z[c] - lse));
                }
            }
        }
        temp * temp * total / rows as f64
    }

    #[test]
    fn distill_loss_is_scaled_kl_and_zero_at_the_target() {
        let logits = [2.0f32, -1.0, 0.5, 0.0, 3.0, -2.0];
        let p = [0.7f32, 0.1, 0.2, 0.0, 1.0, 0.0];
        for temp in [1.0, 4.0] {
            let got = distill_loss(&t(&logits, 2), &t(&p, 2), temp)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let want = kl_ref(&logits, &p, 3, temp);
            assert!((got - want).abs() < 1e-5, "T={temp}: {got} vs {want}");
            assert!(got.is_finite() && got > 0.0);
        }
        // Targets equal to the student's own softened distribution: no loss.
        let own = candle_nn::ops::softmax(&(t(&logits, 2) / 4.0).unwrap(), D::Minus1).unwrap();
        let zero = distill_loss(&t(&logits, 2), &own, 4.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(zero.abs() < 1e-5, "{zero}");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let ok = DistillConfig {
            teachers: vec![PathBuf::from("t.safetensors")],
            weight: 0.9,
            temperature: 4.0,
        };
        assert!(ok.validate().is_ok());
        let cases = [
            (
                DistillConfig {
                    teachers: vec![],
                    ..ok.clone()
                },
                "at least one teacher",
            ),
            (
                DistillConfig {
                    weight: 1.5,
                    ..ok.clone()
                },
                "--distill-weight",
            ),
            (
                DistillConfig {
                    temperature: 0.0,
                    ..ok.clone()
                },
                "--distill-temperature",
            ),
        ];
        for (cfg, want) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
