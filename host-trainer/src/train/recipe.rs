//! Training recipes and the configuration of a run.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::camera_aug::CameraAug;
use crate::distill::DistillConfig;
use crate::model::ArchConfig;
use crate::optim::SgdConfig;
use crate::schedule::{Decay, Schedule};

/// The article's reported accuracy for its Momentum run at 5 epochs.
pub const ARTICLE_MOMENTUM_5: f64 = 74.36;
/// The article's reported accuracy for its Momentum run at 20 epochs.
pub const ARTICLE_MOMENTUM_20: f64 = 70.44;

/// Training recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// Ours: step-decay SGD with Nesterov momentum 0.9, batch 128, lr 0.1
    /// after a 2-epoch linear warm-up, ×0.1 at 50% and 75% of the epochs,
    /// weight decay 5e-4, label smoothing 0.1, camera augmentations
    /// ([`CameraAug::standard`]: crop, flip, zoom, exposure, blur, noise,
    /// RGB565, cutout), 200 epochs; the result is the mean of the weights
    /// after each epoch of the last quarter (SWA, `--swa-from`).
    Default,
    /// The previous default: as `default` but a 1-epoch warm-up then linear
    /// decay to 0, crop + flip only, 30 epochs.
    Linear,
    /// Fine-tuning from `--init` on a small data set: as `default` but lr
    /// 0.01, batch 32, 15 epochs, the first 2 training only the new head.
    Finetune,
    /// The article's Momentum run: lr 0.01, momentum 0.9, batch 64, 5 epochs.
    SeedMomentum,
    /// The article's SGD run: lr 0.1 ×0.1 every 4000 iterations, batch 64, 10 epochs.
    SeedSgdStep,
}

impl Recipe {
    /// Its name on the command line and in files (`default`,
    /// `seed-momentum`, …).
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// Everything that defines a training run (stored in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The recipe this configuration came from.
    pub recipe: Recipe,
    /// Network architecture.
    pub arch: ArchConfig,
    /// Epochs to train.
    pub epochs: usize,
    /// Images per optimizer step.
    pub batch_size: usize,
    /// Optimizer.
    pub sgd: SgdConfig,
    /// Learning-rate schedule over iterations.
    pub schedule: Schedule,
    /// Label smoothing ε (0 = plain cross-entropy).
    pub label_smoothing: f64,
    /// Random crop + flip on the training set.
    pub augment: bool,
    /// Camera augmentations on top of crop + flip (when `augment`).
    #[serde(default)]
    pub camera: Option<CameraAug>,
    /// Checkpoint whose backbone the run starts from (`--init`).
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// With `init`: keep its FC head too (the same classes in the same
    /// order: a continuation of its training, `--keep-head`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_head: bool,
    /// Epochs at the start that train only the FC head.
    #[serde(default)]
    pub freeze_epochs: usize,
    /// Decay per step of an exponential moving average of the weights
    /// ([`crate::ema`]); the run then evaluates and exports the average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
    /// Average the weights at the end of every epoch from this one (1-based)
    /// on (SWA, [`crate::ema`]); the run then evaluates and exports the
    /// average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swa_from: Option<usize>,
    /// Knowledge distillation from teacher checkpoints (`--distill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// Seed for initialization, shuffling and augmentation.
    pub seed: u64,
}

/// A learning-rate decay shape, to replace a recipe's for a like-for-like
/// comparison (`train --decay`): everything else stays the recipe's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayShape {
    /// ×0.1 at 50% and 75% of the iterations (the `default` recipe's).
    Step,
    /// Linear to 0 at the last iteration (the `linear` recipe's).
    Linear,
    /// The peak rate throughout (after the warm-up): for a phase whose
    /// weights are averaged (`--swa-from`).
    Constant,
}

impl TrainConfig {
    /// The running average of the weights this run keeps, if any.
    pub fn averaging(&self) -> Result<Option<crate::ema::Rule>> {
        use crate::ema::Rule;
        match (self.ema, self.swa_from) {
            (Some(_), Some(_)) => anyhow::bail!("--ema and --swa-from exclude each other"),
            (Some(d), None) => {
                crate::ema::check_decay(d)?;
                Ok(Some(Rule::Ema(d)))
            }
            (None, Some(e)) => {
                ensure!(
                    (1..=self.epochs).contains(&e),
                    "--swa-from {e}: the run has epochs 1 to {}",
                    self.epochs
                );
                Ok(Some(Rule::SwaFrom(e)))
            }
            (None, None) => Ok(None),
        }
    }

    /// Replaces the schedule's decay by `shape` over this configuration's
    /// iterations on `train_len` images (warm-up, peak rate and the rest
    /// unchanged).
    pub fn set_decay(&mut self, shape: DecayShape, train_len: usize) {
        let total = train_len / self.batch_size * self.epochs;
        self.schedule.decay = match shape {
            DecayShape::Step => Decay::Milestones {
                at: vec![total / 2, total * 3 / 4],
                gamma: 0.1,
            },
            DecayShape::Linear => Decay::Linear { total },
            DecayShape::Constant => Decay::Constant,
        };
    }

    /// The configuration of `recipe` for `train_len` training images, with
    /// optional overrides of epochs, batch size and peak learning rate.
    pub fn from_recipe(
        recipe: Recipe,
        train_len: usize,
        epochs: Option<usize>,
        batch_size: Option<usize>,
        lr: Option<f64>,
    ) -> Result<Self> {
        let (def_epochs, def_batch) = match recipe {
            Recipe::Default => (200, 128),
            Recipe::Linear => (30, 128),
            Recipe::Finetune => (15, 32),
            Recipe::SeedMomentum => (5, 64),
            Recipe::SeedSgdStep => (10, 64),
        };
        let epochs = epochs.unwrap_or(def_epochs);
        // A set smaller than the recipe's batch trains in one batch.
        let batch_size = batch_size.unwrap_or(def_batch.min(train_len.max(2)));
        ensure!(epochs > 0, "--epochs must be at least 1");
        if let Some(lr) = lr {
            ensure!(
                lr.is_finite() && lr > 0.0,
                "--lr must be a positive, finite number (got {lr})"
            );
        }
        ensure!(
            batch_size >= 2,
            "--batch-size must be at least 2 (batch norm needs two images)"
        );
        ensure!(
            train_len >= batch_size,
            "the training set has {train_len} images, fewer than one batch of {batch_size}"
        );
        let per_epoch = train_len / batch_size;
        let total = per_epoch * epochs;
        let (sgd, schedule, label_smoothing) = match recipe {
            Recipe::Default => (
                NESTEROV,
                Schedule {
                    base_lr: lr.unwrap_or(0.1),
                    decay: Decay::Milestones {
                        at: vec![total / 2, total * 3 / 4],
                        gamma: 0.1,
                    },
                    warmup: (2 * per_epoch).min(total / 4),
                },
                0.1,
            ),
            Recipe::Finetune => (
                NESTEROV,
                Schedule {
                    base_lr: lr.unwrap_or(0.01),
                    decay: Decay::Milestones {
                        at: vec![total / 2, total * 3 / 4],
                        gamma: 0.1,
                    },
                    warmup: 0,
                },
                0.1,
            ),
            Recipe::Linear => (
                NESTEROV,
                Schedule {
                    base_lr: lr.unwrap_or(0.1),
                    decay: Decay::Linear { total },
                    warmup: per_epoch.min(total / 4),
                },
                0.1,
            ),
            Recipe::SeedMomentum => (
                SgdConfig {
                    momentum: 0.9,
                    nesterov: false,
                    weight_decay: 0.0,
                },
                Schedule {
                    base_lr: lr.unwrap_or(0.01),
                    decay: Decay::Constant,
                    warmup: 0,
                },
                0.0,
            ),
            Recipe::SeedSgdStep => (
                SgdConfig {
                    momentum: 0.0,
                    nesterov: false,
                    weight_decay: 0.0,
                },
                Schedule {
                    base_lr: lr.unwrap_or(0.1),
                    decay: Decay::Step {
                        every: 4000,
                        gamma: 0.1,
                    },
                    warmup: 0,
                },
                0.0,
            ),
        };
        Ok(Self {
            recipe,
            arch: ArchConfig::seed(),
            epochs,
            batch_size,
            sgd,
            schedule,
            label_smoothing,
            augment: true,
            camera: matches!(recipe, Recipe::Default | Recipe::Finetune).then(CameraAug::standard),
            init: None,
            keep_head: false,
            freeze_epochs: if recipe == Recipe::Finetune { 2 } else { 0 },
            ema: None,
            // The mean of the last quarter of the epochs: the last
            // learning-rate phase (model card: +0.5 points at 200 epochs).
            swa_from: (recipe == Recipe::Default).then_some(epochs - (epochs / 4).max(1) + 1),
            distill: None,
            seed: 0,
        })
    }
}

/// The default and linear recipes' optimizer.
const NESTEROV: SgdConfig = SgdConfig {
    momentum: 0.9,
    nesterov: true,
    weight_decay: 5e-4,
};
