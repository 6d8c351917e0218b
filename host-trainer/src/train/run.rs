//! The training loop: recipes, checkpoints, resume, metrics, plots and
//! evaluation.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::augment::epoch_order;
pub use crate::camera_aug::CameraAug;
pub use crate::checkpoint::{
    load_checkpoint, model_from_checkpoint, save_checkpoint, write_atomic, Checkpoint,
    CheckpointMeta, DataFingerprint,
};
use crate::data::Dataset;
use crate::model::{ArchConfig, MiniResNet};
use crate::optim::{Sgd, SgdConfig};
use crate::resident::Batches;
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
    /// RGB565, cutout), 100 epochs.
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
    /// Epochs at the start that train only the FC head.
    #[serde(default)]
    pub freeze_epochs: usize,
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
}

impl TrainConfig {
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
            Recipe::Default => (100, 128),
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
            freeze_epochs: if recipe == Recipe::Finetune { 2 } else { 0 },
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

/// Metrics of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training accuracy (%) over the epoch, on augmented images.
    pub train_acc: f64,
    /// Test loss (plain cross-entropy).
    pub test_loss: f64,
    /// Test accuracy (%), one pass, no test-time augmentation.
    pub test_acc: f64,
    /// Learning rate at the last step of the epoch.
    pub lr: f64,
    /// Wall time of the training part of the epoch, seconds.
    pub seconds: f64,
    /// Training throughput.
    pub images_per_sec: f64,
}

/// Result of evaluating a model on a data set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy, %.
    pub accuracy: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
    /// Class names (the test set's).
    pub classes: Vec<String>,
}

impl Evaluation {
    /// The name of class `c` (`?` if unknown).
    pub fn class_name(&self, c: usize) -> &str {
        self.classes.get(c).map_or("?", String::as_str)
    }

    /// Accuracy of each class, %.
    pub fn per_class(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| 100.0 * row[c] as f64 / row.iter().sum::<usize>().max(1) as f64)
            .collect()
    }
}

/// Resolves `--device`. Without a usable GPU, `cuda` is an error that says
/// why (never a panic); in a build without the `cuda` feature it says how to
/// build one.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(),
        other => bail!("unknown device `{other}` (expected `cpu` or `cuda`)"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Device::new_cuda(0).map_err(|e| {
        anyhow::anyhow!(
            "cannot open CUDA device 0: {e}\n\
             --device cuda needs an NVIDIA GPU and its driver (CUDA 13.0 or newer; \
             `nvidia-smi` shows both); use --device cpu otherwise"
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    bail!(
        "this host-trainer was built without CUDA support; build it with \
         `cargo build --release -p host-trainer --features cuda` \
         (docs/gpu.md says what that needs), or use --device cpu"
    )
}

/// Cross-entropy with label smoothing `eps`, averaged over the batch.
pub fn smoothed_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = candle_nn::loss::nll(&logp, labels)?;
    if eps == 0.0 {
        return Ok(nll);
    }
    let uniform = logp.mean(D::Minus1)?.mean_all()?.neg()?;
    (nll * (1.0 - eps))? + (uniform * eps)?
}

/// Evaluates `model` on `ds` (no augmentation), `batch_size` images at a time.
pub fn evaluate(
    model: &MiniResNet,
    ds: &Dataset,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let classes = model.arch.classes;
    let mut confusion = vec![vec![0usize; classes]; classes];
    let mut loss_sum = 0.0;
    let idx: Vec<usize> = (0..ds.len()).collect();
    let batches = Batches::new(ds, device)?;
    for chunk in idx.chunks(batch_size.max(1)) {
        let (x, y) = batches.batch(chunk, None)?;
        let logits = model.forward_t(&x, false)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * chunk.len() as f64;
        let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        for (&i, p) in chunk.iter().zip(pred) {
            confusion[ds.labels[i] as usize][p as usize] += 1;
        }
    }
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    Ok(Evaluation {
        loss: loss_sum / ds.len().max(1) as f64,
        accuracy: 100.0 * correct as f64 / ds.len().max(1) as f64,
        confusion,
        classes: ds.classes.clone(),
    })
}

/// A model with its variables.
pub struct Trainee {
    /// The variables (weights, BN statistics).
    pub varmap: VarMap,
    /// The network over those variables.
    pub model: MiniResNet,
}

impl std::fmt::Debug for Trainee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainee")
            .field("arch", &self.model.arch)
            .finish_non_exhaustive()
    }
}

impl Trainee {
    /// A freshly initialized model. Initialization is a pure function of
    /// `seed` (candle cannot seed its CPU generator), see
    /// [`crate::model::init_values`].
    pub fn new(arch: &ArchConfig, seed: u64, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = MiniResNet::new(arch, vb)?;
        let t = Self { varmap, model };
        for (name, var) in t.named_vars() {
            let values = crate::model::init_values(&name, var.dims(), seed);
            var.set(&Tensor::from_vec(values, var.dims(), device)?)?;
        }
        Ok(t)
    }

    /// Named variables, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, candle_core::Var)> {
        let data = self.varmap.data().lock().expect("varmap lock poisoned");
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Options of a training run that are not part of its configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Folder for checkpoints, metrics and plots.
    pub run_dir: PathBuf,
    /// Continue from `run_dir/checkpoint.safetensors`.
    pub resume: bool,
    /// Batch size for evaluation.
    pub eval_batch: usize,
    /// Stop after this many epochs in this invocation (for tests that
    /// simulate an interruption); `None` runs to the end.
    pub stop_after: Option<usize>,
    /// Show progress bars.
    pub progress: bool,
}

/// The outcome of [`train`].
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained model.
    pub trainee: Trainee,
    /// Metrics of every epoch so far.
    pub history: Vec<EpochMetrics>,
    /// Final test evaluation.
    pub test: Evaluation,
}

/// Where a run stands: the model, its optimizer and what is done.
struct RunState {
    trainee: Trainee,
    opt: Sgd,
    history: Vec<EpochMetrics>,
    iteration: usize,
    epoch: usize,
}

/// Opens the run in `opts.run_dir`: a fresh one, or with `opts.resume` the
/// one in its checkpoint, which must have the same configuration (only
/// `--epochs` may change) and the same training set. On resume, the metrics
/// and the curve are rewritten from the checkpoint's history, so a kill
/// between the checkpoint and them leaves nothing out of step.
fn open_run(
    cfg: &TrainConfig,
    data: &DataFingerprint,
    opts: &RunOptions,
    device: &Device,
) -> Result<RunState> {
    let ckpt_path = opts.run_dir.join("checkpoint.safetensors");
    if !opts.resume {
        ensure!(
            !ckpt_path.exists(),
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --run-dir",
            opts.run_dir.display()
        );
        let trainee = Trainee::new(&cfg.arch, cfg.seed, device)?;
        if let Some(init) = &cfg.init {
            let n = crate::transfer::init_from(&trainee, cfg, init, device)?;
            eprintln!(
                "init: {n} backbone tensors from {}, a new head for {} classes{}",
                init.display(),
                cfg.arch.classes,
                match cfg.freeze_epochs {
                    0 => String::new(),
                    k => format!("; epochs 1-{k} train only the head"),
                }
            );
        }
        let opt = Sgd::new(trainee.named_vars(), cfg.sgd);
        return Ok(RunState {
            trainee,
            opt,
            history: Vec::new(),
            iteration: 0,
            epoch: 0,
        });
    }
    let ck = load_checkpoint(&ckpt_path, device).with_context(|| {
        format!(
            "--resume: cannot continue the run in {}",
            opts.run_dir.display()
        )
    })?;
    check_resume_config(&ck.meta.config, cfg)?;
    ensure!(
        !ck.weights_only,
        "--resume: {} holds weights only (no momentum buffers), so the run cannot continue \
         bit-exactly; start a new --run-dir",
        ckpt_path.display()
    );
    match &ck.meta.data {
        Some(saved) => saved.check_resume(data)?,
        None => eprintln!(
            "warning: --resume: {} does not record its data set; make sure --data and --train-limit are the run's",
            ckpt_path.display()
        ),
    }
    let trainee = model_from_checkpoint(&ck, device)?;
    let mut opt = Sgd::new(trainee.named_vars(), cfg.sgd);
    for (name, tensor) in &ck.tensors {
        if let Some(p) = name.strip_prefix("momentum.") {
            opt.set_state(p, tensor.clone())?;
        }
    }
    write_epoch_outputs(&opts.run_dir, &ck.meta.history, cfg.recipe)?;
    eprintln!(
        "resuming {} at epoch {} (iteration {})",
        opts.run_dir.display(),
        ck.meta.epoch + 1,
        ck.meta.iteration
    );
    Ok(RunState {
        trainee,
        opt,
        history: ck.meta.history,
        iteration: ck.meta.iteration,
        epoch: ck.meta.epoch,
    })
}

/// `--resume` may change `--epochs` (and with it the schedule's length:
/// decay and warm-up follow from the epoch count), nothing else.
fn check_resume_config(saved: &TrainConfig, cfg: &TrainConfig) -> Result<()> {
    let same_schedule_kind = std::mem::discriminant(&saved.schedule.decay)
        == std::mem::discriminant(&cfg.schedule.decay)
        && saved.schedule.base_lr == cfg.schedule.base_lr;
    ensure!(
        same_schedule_kind
            && TrainConfig {
                epochs: cfg.epochs,
                schedule: cfg.schedule.clone(),
                ..saved.clone()
            } == *cfg,
        "--resume: the options differ from the run's saved configuration (only --epochs may change)\n saved: {}\n given: {}",
        serde_json::to_string(saved)?,
        serde_json::to_string(cfg)?
    );
    Ok(())
}

/// `metrics.csv`, `metrics.json` and `learning_curve.svg` of `history`.
fn write_epoch_outputs(dir: &Path, history: &[EpochMetrics], recipe: Recipe) -> Result<()> {
    write_metrics(dir, history)?;
    plot_learning_curve(&dir.join("learning_curve.svg"), history, recipe)
}

/// Trains (or resumes) a run. Writes into `opts.run_dir`:
/// `checkpoint.safetensors` (every epoch, atomic), `metrics.csv`,
/// `metrics.json`, `learning_curve.svg`, `config.json`, and at the end
/// `confusion.csv` and `per_class.json`.
///
/// A diverged run (a non-finite loss, weight or metric) ends with an error
/// naming the epoch and step; the checkpoint keeps the last good epoch.
pub fn train(
    cfg: TrainConfig,
    train_set: &Dataset,
    test_set: &Dataset,
    opts: &RunOptions,
    device: &Device,
) -> Result<TrainOutcome> {
    cfg.arch.validate()?;
    fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating run folder {}", opts.run_dir.display()))?;
    let data = DataFingerprint::of(train_set, test_set);
    let mut run = open_run(&cfg, &data, opts, device)?;
    write_atomic(
        &opts.run_dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    ensure!(
        train_set.len() / cfg.batch_size > 0,
        "the training set has {} images, fewer than one batch",
        train_set.len()
    );
    let last_epoch = match opts.stop_after {
        Some(n) => (run.epoch + n).min(cfg.epochs),
        None => cfg.epochs,
    };
    let batches = Batches::new(train_set, device)?;
    while run.epoch < last_epoch {
        let m = train_epoch(&cfg, &mut run, &batches, train_set.len(), opts, device)?;
        let test = evaluate(&run.trainee.model, test_set, opts.eval_batch, device)?;
        let m = EpochMetrics {
            test_loss: test.loss,
            test_acc: test.accuracy,
            ..m
        };
        eprintln!(
            "epoch {:>3}/{}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}% | lr {:.5} | {:.0} s, {:.0} img/s",
            m.epoch, cfg.epochs, m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.lr, m.seconds, m.images_per_sec
        );
        run.history.push(m);
        run.epoch += 1;
        let meta = CheckpointMeta {
            config: cfg.clone(),
            epoch: run.epoch,
            iteration: run.iteration,
            history: run.history.clone(),
            data: Some(data.clone()),
        };
        save_checkpoint(
            &opts.run_dir.join("checkpoint.safetensors"),
            &run.trainee,
            &run.opt,
            &meta,
        )?;
        write_epoch_outputs(&opts.run_dir, &run.history, cfg.recipe)?;
    }
    let test = evaluate(&run.trainee.model, test_set, opts.eval_batch, device)?;
    write_confusion(&opts.run_dir, &test)?;
    Ok(TrainOutcome {
        trainee: run.trainee,
        history: run.history,
        test,
    })
}

/// One epoch of training steps; the returned metrics lack the test figures.
fn train_epoch(
    cfg: &TrainConfig,
    run: &mut RunState,
    batches: &Batches,
    train_len: usize,
    opts: &RunOptions,
    device: &Device,
) -> Result<EpochMetrics> {
    let (epoch, steps) = (run.epoch, train_len / cfg.batch_size);
    let order = epoch_order(train_len, cfg.seed, epoch);
    let bar = progress_bar(
        opts.progress,
        steps as u64,
        &format!("epoch {}/{}", epoch + 1, cfg.epochs),
    );
    // Reading the loss back stalls a GPU's queue: there, the running loss
    // and accuracy stay on the device and are read every `sync_every` steps.
    let sync_every = if device.is_cpu() { 1 } else { GPU_SYNC_EVERY };
    // Cross-entropy at chance is ln(classes); a healthy run stays far below
    // 20 times that even in its first steps.
    let divergence_limit = 20.0 * (cfg.arch.classes.max(2) as f64).ln();
    let t0 = Instant::now();
    let mut sums = RunningSums::new(device)?;
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0usize);
    let mut lr = cfg.schedule.lr(run.iteration);
    for step in 0..steps {
        let idx = &order[step * cfg.batch_size..(step + 1) * cfg.batch_size];
        lr = cfg.schedule.lr(run.iteration);
        let (x, y) = match (&cfg.camera, cfg.augment) {
            (Some(cam), true) => batches.camera_batch(idx, cam, cfg.seed, epoch)?,
            _ => batches.batch(idx, cfg.augment.then_some((cfg.seed, epoch)))?,
        };
        let logits = run.trainee.model.forward_t(&x, true)?;
        let loss = smoothed_cross_entropy(&logits, &y, cfg.label_smoothing)?;
        sums.add(&loss, &logits, &y)?;
        let grads = loss.backward()?;
        run.opt
            .step_where(&grads, lr, |n| crate::transfer::trains(cfg, epoch, n))?;
        run.iteration += 1;
        seen += idx.len();
        if (step + 1) % sync_every != 0 && step + 1 != steps {
            continue;
        }
        (loss_sum, correct) = sums.read()?;
        let mean = loss_sum / seen as f64;
        if !mean.is_finite() || mean > divergence_limit {
            let ckpt = opts.run_dir.join("checkpoint.safetensors");
            let kept = match epoch {
                0 => "no epoch had completed, so no checkpoint was written".to_string(),
                _ => format!(
                    "the last good checkpoint is {} (epoch {epoch})",
                    ckpt.display()
                ),
            };
            bail!(
                "training diverged: the mean loss is {mean} by epoch {}, step {} (iteration {}, lr {lr}; \
                 a loss above {divergence_limit:.0}, 20 times chance level, counts as diverged); \
                 {kept}. Lower --lr or check the data.",
                epoch + 1,
                step + 1,
                run.iteration - 1,
            );
        }
        bar.set_message(format!(
            "loss {:.3} acc {:.1}% lr {lr:.4} {:.0} img/s",
            loss_sum / seen as f64,
            100.0 * correct / seen as f64,
            seen as f64 / t0.elapsed().as_secs_f64()
        ));
        bar.set_position(step as u64 + 1);
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    Ok(EpochMetrics {
        epoch: epoch + 1,
        train_loss: loss_sum / seen as f64,
        train_acc: 100.0 * correct / seen as f64,
        test_loss: f64::NAN,
        test_acc: f64::NAN,
        lr,
        seconds,
        images_per_sec: seen as f64 / seconds,
    })
}

/// Steps between reads of the running loss on a GPU (a divergence is
/// caught at the first read after it).
const GPU_SYNC_EVERY: usize = 25;

/// An epoch's summed loss (× batch size) and correct predictions, kept on
/// the device until read.
struct RunningSums {
    loss: Tensor,
    correct: Tensor,
}

impl RunningSums {
    fn new(device: &Device) -> Result<Self> {
        Ok(Self {
            loss: Tensor::zeros((), DType::F32, device)?,
            correct: Tensor::zeros((), DType::F32, device)?,
        })
    }

    fn add(&mut self, loss: &Tensor, logits: &Tensor, labels: &Tensor) -> Result<()> {
        let n = labels.dims1()? as f64;
        self.loss = (&self.loss + (loss.detach() * n)?)?;
        let hits = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F32)?;
        self.correct = (&self.correct + hits.sum_all()?)?;
        Ok(())
    }

    /// `(loss sum, correct count)`.
    fn read(&self) -> Result<(f64, f64)> {
        Ok((
            self.loss.to_scalar::<f32>()? as f64,
            self.correct.to_scalar::<f32>()? as f64,
        ))
    }
}

fn progress_bar(show: bool, len: u64, prefix: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Writes `metrics.csv` and `metrics.json`.
pub fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut csv =
        String::from("epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds,images_per_sec\n");
    for m in history {
        csv.push_str(&format!(
            "{},{:.6},{:.4},{:.6},{:.4},{:.8},{:.3},{:.2}\n",
            m.epoch,
            m.train_loss,
            m.train_acc,
            m.test_loss,
            m.test_acc,
            m.lr,
            m.seconds,
            m.images_per_sec
        ));
    }
    write_atomic(&dir.join("metrics.csv"), csv.as_bytes())?;
    write_atomic(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(history)?.as_bytes(),
    )
}

/// Writes `confusion.csv` (rows: true class, columns: predicted) and
/// `per_class.json`.
pub fn write_confusion(dir: &Path, ev: &Evaluation) -> Result<()> {
    let names: Vec<&str> = (0..ev.confusion.len()).map(|c| ev.class_name(c)).collect();
    let mut csv = format!("true\\predicted,{}\n", names.join(","));
    for (c, row) in ev.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        csv.push_str(&format!("{},{}\n", names[c], cells.join(",")));
    }
    write_atomic(&dir.join("confusion.csv"), csv.as_bytes())?;
    let per: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(ev.per_class())
        .map(|(n, a)| (n.to_string(), serde_json::json!(a)))
        .collect();
    write_atomic(
        &dir.join("per_class.json"),
        serde_json::to_string_pretty(&per)?.as_bytes(),
    )
}

/// Formats the confusion matrix and per-class accuracy for the terminal.
pub fn format_confusion(ev: &Evaluation) -> String {
    let mut s = String::from("true \\ pred  ");
    for c in 0..ev.confusion.len() {
        let short: String = ev.class_name(c).chars().take(4).collect();
        s.push_str(&format!("{short:>6}"));
    }
    s.push_str("   acc\n");
    for (c, (row, acc)) in ev.confusion.iter().zip(ev.per_class()).enumerate() {
        s.push_str(&format!("{:<12} ", ev.class_name(c)));
        for v in row {
            s.push_str(&format!("{v:>6}"));
        }
        s.push_str(&format!("  {acc:5.1}%\n"));
    }
    s
}

/// Draws the learning curve (accuracy and loss per epoch) as SVG, with the
/// article's Momentum figure as a reference line.
pub fn plot_learning_curve(path: &Path, history: &[EpochMetrics], recipe: Recipe) -> Result<()> {
    use plotters::prelude::*;
    // Drawn into memory, then written atomically: a full disk leaves the
    // previous curve, never a truncated one.
    let mut svg = String::new();
    let draw = |svg: &mut String| -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(svg, (960, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(480);
        let n = history.len().max(2) as f64;
        let mut acc = ChartBuilder::on(&left)
            .caption(format!("accuracy ({recipe:?})"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(1f64..n, 0f64..100f64)?;
        acc.configure_mesh().x_desc("epoch").y_desc("%").draw()?;
        type Field = fn(&EpochMetrics) -> f64;
        let curves: [(&str, RGBColor, Field); 2] = [
            ("train (augmented)", BLUE, |m| m.train_acc),
            ("test", RED, |m| m.test_acc),
        ];
        for (label, color, field) in curves {
            acc.draw_series(LineSeries::new(
                history.iter().map(|m| (m.epoch as f64, field(m))),
                color,
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        acc.draw_series(LineSeries::new(
            [(1.0, ARTICLE_MOMENTUM_5), (n, ARTICLE_MOMENTUM_5)],
            BLACK.mix(0.4),
        ))?
        .label("article, Momentum 5 ep (74.36%)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK.mix(0.4)));
        acc.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .draw()?;
        let max_loss = history
            .iter()
            .flat_map(|m| [m.train_loss, m.test_loss])
            .fold(0.1f64, f64::max);
        let mut loss = ChartBuilder::on(&right)
            .caption("loss", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(1f64..n, 0f64..max_loss * 1.05)?;
        loss.configure_mesh().x_desc("epoch").draw()?;
        loss.draw_series(LineSeries::new(
            history.iter().map(|m| (m.epoch as f64, m.train_loss)),
            &BLUE,
        ))?;
        loss.draw_series(LineSeries::new(
            history.iter().map(|m| (m.epoch as f64, m.test_loss)),
            &RED,
        ))?;
        root.present()?;
        Ok(())
    };
    // plotters' error is a `Box<dyn Error>` without `Send`: anyhow cannot
    // hold it as a source, so its message is kept.
    draw(&mut svg).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    write_atomic(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert!(device("cpu").unwrap().is_cpu());
        let e = device("gpu").unwrap_err().to_string();
        assert!(e.contains("unknown device `gpu`"), "{e}");
    }

    /// Without the feature, `cuda` says how to build with it.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = device("cuda").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }

    fn tiny_config(epochs: usize) -> TrainConfig {
        let mut cfg =
            TrainConfig::from_recipe(Recipe::Default, 64, Some(epochs), Some(16), Some(0.05))
                .unwrap();
        cfg.arch = ArchConfig {
            widths: vec![4, 8],
            blocks: vec![1, 1],
            maxpool: true,
            classes: 4,
        };
        cfg.seed = 3;
        cfg
    }

    /// `train` on the CPU with test options (evaluation batch 32, no progress bars).
    fn run_cpu(
        cfg: TrainConfig,
        train_set: &Dataset,
        test_set: &Dataset,
        dir: &Path,
        resume: bool,
        stop_after: Option<usize>,
    ) -> Result<TrainOutcome> {
        train(
            cfg,
            train_set,
            test_set,
            &opts(dir, resume, stop_after),
            &Device::Cpu,
        )
    }

    fn opts(dir: &Path, resume: bool, stop_after: Option<usize>) -> RunOptions {
        RunOptions {
            run_dir: dir.to_path_buf(),
            resume,
            eval_batch: 32,
            stop_after,
            progress: false,
        }
    }

    fn weights(t: &Trainee) -> Vec<(String, Vec<f32>)> {
        t.named_vars()
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn resume_equals_uninterrupted_run() {
        let train_set = crate::data::synthetic(64, 4, 1);
        let test_set = crate::data::synthetic(32, 4, 2);
        let a = tempfile::tempdir().unwrap();
        let straight =
            run_cpu(tiny_config(3), &train_set, &test_set, a.path(), false, None).unwrap();
        let b = tempfile::tempdir().unwrap();
        // "Killed" after epoch 1, then resumed twice.
        run_cpu(
            tiny_config(3),
            &train_set,
            &test_set,
            b.path(),
            false,
            Some(1),
        )
        .unwrap();
        run_cpu(
            tiny_config(3),
            &train_set,
            &test_set,
            b.path(),
            true,
            Some(1),
        )
        .unwrap();
        let resumed = run_cpu(tiny_config(3), &train_set, &test_set, b.path(), true, None).unwrap();
        assert_eq!(weights(&straight.trainee), weights(&resumed.trainee));
        assert_eq!(straight.history.len(), 3);
        assert_eq!(resumed.history.len(), 3);
        for (x, y) in straight.history.iter().zip(&resumed.history) {
            assert_eq!((x.train_loss, x.test_acc), (y.train_loss, y.test_acc));
        }
        for f in [
            "metrics.csv",
            "metrics.json",
            "learning_curve.svg",
            "confusion.csv",
            "per_class.json",
            "config.json",
        ] {
            assert!(b.path().join(f).exists(), "{f}");
        }
        let csv = fs::read_to_string(b.path().join("metrics.csv")).unwrap();
        assert_eq!(csv.lines().count(), 4);
    }

    #[test]
    fn learns_the_toy_task() {
        let train_set = crate::data::synthetic(256, 4, 5);
        let test_set = crate::data::synthetic(64, 4, 6);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(4);
        cfg.schedule.decay = Decay::Linear {
            total: 4 * 256 / 16,
        };
        let out = run_cpu(cfg, &train_set, &test_set, dir.path(), false, None).unwrap();
        assert!(
            out.test.accuracy > 60.0,
            "toy accuracy {}",
            out.test.accuracy
        );
    }

    #[test]
    fn resume_may_change_the_epoch_count_and_nothing_else() {
        let train_set = crate::data::synthetic(64, 4, 1);
        let test_set = crate::data::synthetic(32, 4, 2);
        let d = tempfile::tempdir().unwrap();
        run_cpu(
            tiny_config(2),
            &train_set,
            &test_set,
            d.path(),
            false,
            Some(1),
        )
        .unwrap();
        let mut other_lr = tiny_config(3);
        other_lr.schedule.base_lr = 0.2;
        let err = run_cpu(other_lr, &train_set, &test_set, d.path(), true, None).unwrap_err();
        assert!(
            format!("{err:#}").contains("only --epochs may change"),
            "{err:#}"
        );
        // A longer run: the linear decay now ends at epoch 3.
        let r = run_cpu(tiny_config(3), &train_set, &test_set, d.path(), true, None).unwrap();
        assert_eq!(r.history.len(), 3);
        assert!(r.history[2].lr < r.history[1].lr);
    }

    #[test]
    fn refuses_to_overwrite_and_rejects_changed_resume() {
        let train_set = crate::data::synthetic(32, 4, 1);
        let dir = tempfile::tempdir().unwrap();
        run_cpu(
            tiny_config(1),
            &train_set,
            &train_set,
            dir.path(),
            false,
            None,
        )
        .unwrap();
        let err = run_cpu(
            tiny_config(1),
            &train_set,
            &train_set,
            dir.path(),
            false,
            None,
        )
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("--resume"), "{err:#}");
        let mut other = tiny_config(2);
        other.seed = 99;
        let err = run_cpu(other, &train_set, &train_set, dir.path(), true, None)
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("saved configuration"),
            "{err:#}"
        );
    }

    #[test]
    fn nan_loss_stops_with_a_clear_message() {
        let train_set = crate::data::synthetic(32, 4, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(1);
        cfg.schedule.base_lr = f64::INFINITY; // the first update makes every weight non-finite
        cfg.schedule.warmup = 0;
        let err = run_cpu(cfg, &train_set, &train_set, dir.path(), false, None)
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("training diverged") && msg.contains("epoch 1, step"),
            "{msg}"
        );
    }

    #[test]
    fn a_non_finite_state_never_replaces_the_last_good_checkpoint() {
        let cfg = tiny_config(1);
        let t = Trainee::new(&cfg.arch, cfg.seed, &Device::Cpu).unwrap();
        let opt = Sgd::new(t.named_vars(), cfg.sgd);
        let meta = CheckpointMeta {
            config: cfg.clone(),
            epoch: 1,
            iteration: 4,
            history: Vec::new(),
            data: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        save_checkpoint(&path, &t, &opt, &meta).unwrap();
        let good = fs::read(&path).unwrap();
        let (name, var) = t.named_vars().into_iter().nth(1).unwrap();
        let mut v = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let last = v.len() - 1;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            v[last] = bad;
            var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let meta = CheckpointMeta {
                epoch: 2,
                ..meta.clone()
            };
            let msg = format!("{:#}", save_checkpoint(&path, &t, &opt, &meta).unwrap_err());
            assert!(
                msg.contains(&format!("`model.{name}` holds {bad} at element {last}"))
                    && msg.contains("epoch 2"),
                "{msg}"
            );
            assert!(
                fs::read(&path).unwrap() == good,
                "the good checkpoint was replaced"
            );
        }
        assert_eq!(load_checkpoint(&path, &Device::Cpu).unwrap().meta.epoch, 1);
    }

    #[test]
    fn damaged_checkpoint_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoint.safetensors");
        fs::write(&p, b"not a checkpoint").unwrap();
        let err = load_checkpoint(&p, &Device::Cpu).err().unwrap();
        assert!(
            format!("{err:#}").contains("checkpoint.safetensors"),
            "{err:#}"
        );
    }

    /// The toy training and test sets of the checkpoint tests.
    fn toy_sets() -> (Dataset, Dataset) {
        (
            crate::data::synthetic(64, 4, 1),
            crate::data::synthetic(32, 4, 2),
        )
    }

    /// One epoch into `dir` (the "interrupted" run of the tests below).
    fn one_epoch(dir: &Path, train_set: &Dataset, test_set: &Dataset) {
        run_cpu(tiny_config(3), train_set, test_set, dir, false, Some(1)).unwrap();
    }

    /// `--init`: the backbone comes from the checkpoint, the head is new
    /// and sized to the new classes; a frozen epoch moves only the head
    /// (and the BN statistics); a later epoch moves everything. A
    /// checkpoint of another architecture is an error naming it.
    #[test]
    fn init_copies_the_backbone_and_freezing_trains_only_the_head() {
        let (train_set, test_set) = toy_sets();
        let src = tempfile::tempdir().unwrap();
        one_epoch(src.path(), &train_set, &test_set);
        let init = src.path().join("checkpoint.safetensors");
        let source =
            model_from_checkpoint(&load_checkpoint(&init, &Device::Cpu).unwrap(), &Device::Cpu)
                .unwrap();
        let (three, three_test) = (
            crate::data::synthetic(48, 3, 7),
            crate::data::synthetic(24, 3, 8),
        );
        let mut cfg = tiny_config(2);
        cfg.arch.classes = 3;
        cfg.init = Some(init.clone());
        cfg.freeze_epochs = 1;
        let dir = tempfile::tempdir().unwrap();
        let frozen = run_cpu(cfg.clone(), &three, &three_test, dir.path(), false, Some(1)).unwrap();
        let before = weights(&source);
        let after = weights(&frozen.trainee);
        let conv =
            |w: &[(String, Vec<f32>)], n: &str| w.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(
            conv(&after, "stem.conv.weight"),
            conv(&before, "stem.conv.weight")
        );
        assert_eq!(conv(&after, "fc.weight").len(), 3 * 8);
        assert_ne!(conv(&after, "fc.bias"), vec![0.0; 3]);
        let thawed = run_cpu(cfg.clone(), &three, &three_test, dir.path(), true, None).unwrap();
        assert_ne!(
            conv(&weights(&thawed.trainee), "stem.conv.weight"),
            conv(&before, "stem.conv.weight")
        );

        let mut other = cfg;
        other.arch.widths = vec![4, 16];
        let e = format!(
            "{:#}",
            run_cpu(
                other,
                &three,
                &three_test,
                tempfile::tempdir().unwrap().path(),
                false,
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains("--init") && e.contains(&init.display().to_string()) && e.contains("widths"),
            "{e}"
        );
    }

    /// The committed float checkpoint: weights and BN statistics only,
    /// the same eval logits, its provenance kept, and no resume from it.
    #[test]
    fn a_weights_only_checkpoint_evaluates_the_same_and_cannot_be_resumed() {
        let (train_set, test_set) = toy_sets();
        let dir = tempfile::tempdir().unwrap();
        one_epoch(dir.path(), &train_set, &test_set);
        let p = dir.path().join("checkpoint.safetensors");
        let full = load_checkpoint(&p, &Device::Cpu).unwrap();
        assert!(!full.weights_only);
        let w = dir.path().join("weights.safetensors");
        crate::checkpoint::save_weights(&w, &full, "test rev").unwrap();
        let slim = load_checkpoint(&w, &Device::Cpu).unwrap();
        assert!(slim.weights_only);
        assert!(slim.tensors.keys().all(|n| n.starts_with("model.")));
        assert!(full.tensors.keys().any(|n| n.starts_with("momentum.")));
        assert_eq!(
            crate::checkpoint::read_provenance(&w).unwrap().as_deref(),
            Some("test rev")
        );
        let eval = |ck: &crate::checkpoint::Checkpoint| {
            let t = model_from_checkpoint(ck, &Device::Cpu).unwrap();
            evaluate(&t.model, &test_set, 64, &Device::Cpu)
                .unwrap()
                .loss
        };
        assert_eq!(eval(&full), eval(&slim));
        fs::rename(&w, &p).unwrap();
        let err = format!(
            "{:#}",
            run_cpu(
                tiny_config(3),
                &train_set,
                &test_set,
                dir.path(),
                true,
                None
            )
            .unwrap_err()
        );
        assert!(err.contains("weights only"), "{err}");
    }

    #[test]
    fn a_flipped_bit_in_a_checkpoint_is_caught_by_its_checksum() {
        let (train_set, test_set) = toy_sets();
        let dir = tempfile::tempdir().unwrap();
        one_epoch(dir.path(), &train_set, &test_set);
        let p = dir.path().join("checkpoint.safetensors");
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 3; // inside the last tensor's data
        bytes[last] ^= 0x40; // an exponent bit: the value stays finite
        fs::write(&p, &bytes).unwrap();
        let err = format!("{:#}", load_checkpoint(&p, &Device::Cpu).unwrap_err());
        assert!(
            err.contains("damaged checkpoint") && err.contains("checksum"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            run_cpu(
                tiny_config(3),
                &train_set,
                &test_set,
                dir.path(),
                true,
                None
            )
            .unwrap_err()
        );
        assert!(
            err.contains("--resume") && err.contains("checksum"),
            "{err}"
        );
    }

    #[test]
    fn resume_refuses_another_training_set_and_warns_on_another_test_set() {
        let (train_set, test_set) = toy_sets();
        let dir = tempfile::tempdir().unwrap();
        one_epoch(dir.path(), &train_set, &test_set);
        // Same size, other images (as another --data would give).
        let other = crate::data::synthetic(64, 4, 9);
        let err = format!(
            "{:#}",
            run_cpu(tiny_config(3), &other, &test_set, dir.path(), true, Some(1)).unwrap_err()
        );
        assert!(err.contains("training set differs"), "{err}");
        // Another test set is allowed (a warning is printed).
        let test2 = crate::data::synthetic(16, 4, 3);
        run_cpu(
            tiny_config(3),
            &train_set,
            &test2,
            dir.path(),
            true,
            Some(1),
        )
        .unwrap();
    }

    /// A kill between the checkpoint and the metrics: resume rewrites the
    /// metrics and the curve from the checkpoint's history.
    #[test]
    fn resume_brings_metrics_and_curve_back_in_step() {
        let (train_set, test_set) = toy_sets();
        let dir = tempfile::tempdir().unwrap();
        one_epoch(dir.path(), &train_set, &test_set);
        let csv = dir.path().join("metrics.csv");
        let full = fs::read_to_string(&csv).unwrap();
        fs::write(&csv, full.lines().next().unwrap()).unwrap(); // header only
        fs::remove_file(dir.path().join("learning_curve.svg")).unwrap();
        run_cpu(
            tiny_config(3),
            &train_set,
            &test_set,
            dir.path(),
            true,
            Some(0),
        )
        .unwrap();
        assert_eq!(fs::read_to_string(&csv).unwrap(), full);
        let svg = fs::read_to_string(dir.path().join("learning_curve.svg")).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        let json = fs::read_to_string(dir.path().join("metrics.json")).unwrap();
        assert!(!json.contains("null"), "{json}");
    }

    #[test]
    fn bad_learning_rates_are_refused() {
        for lr in [0.0, -0.1, f64::NAN, f64::INFINITY] {
            let e = TrainConfig::from_recipe(Recipe::Default, 64, Some(1), Some(16), Some(lr))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--lr must be a positive, finite number"),
                "{lr}: {e}"
            );
        }
    }

    /// `--lr 100`: the run ends with an error naming the epoch and step, and
    /// the last good checkpoint (epoch 1, trained at a sane rate) stays
    /// readable and resumable.
    #[test]
    fn a_diverging_run_fails_and_keeps_the_last_good_checkpoint() {
        let (train_set, test_set) = toy_sets();
        let dir = tempfile::tempdir().unwrap();
        one_epoch(dir.path(), &train_set, &test_set);
        let p = dir.path().join("checkpoint.safetensors");
        // Same run, lr 100 from here on (what a bad --lr does to a fresh run
        // from its first step).
        let mut cfg = tiny_config(3);
        cfg.schedule.base_lr = 100.0;
        cfg.schedule.warmup = 0;
        let mut ck = load_checkpoint(&p, &Device::Cpu).unwrap();
        ck.meta.config = cfg.clone();
        let t = model_from_checkpoint(&ck, &Device::Cpu).unwrap();
        let opt = Sgd::new(t.named_vars(), cfg.sgd);
        save_checkpoint(&p, &t, &opt, &ck.meta).unwrap();
        let good = fs::read(&p).unwrap();
        let err = format!(
            "{:#}",
            run_cpu(cfg.clone(), &train_set, &test_set, dir.path(), true, None).unwrap_err()
        );
        assert!(
            err.contains("diverged") || err.contains("not saving"),
            "{err}"
        );
        assert!(err.contains("epoch"), "{err}");
        assert_eq!(
            fs::read(&p).unwrap(),
            good,
            "the last good checkpoint was replaced"
        );
        assert_eq!(load_checkpoint(&p, &Device::Cpu).unwrap().meta.epoch, 1);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming onto a non-empty folder fails, as a full disk would fail
        // the write: the temporary file must go.
        let target = dir.path().join("metrics.csv");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, b"data").is_err());
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("metrics.csv")]);
    }

    #[test]
    fn smoothed_loss_by_hand() {
        let logits = Tensor::new(&[[0f32, 0.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        // Uniform logits: both terms are ln 2.
        let l = smoothed_cross_entropy(&logits, &y, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - std::f32::consts::LN_2).abs() < 1e-6);
        let logits = Tensor::new(&[[2f32, 0.0]], &Device::Cpu).unwrap();
        let l = smoothed_cross_entropy(&logits, &y, 0.2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let lse = (2f64.exp() + 1.0).ln();
        let want = 0.8 * lse + 0.2 * (lse - 1.0);
        assert!((l - want).abs() < 1e-5, "{l} {want}");
    }

    #[test]
    fn recipes() {
        let s = TrainConfig::from_recipe(Recipe::SeedSgdStep, 50_000, None, None, None).unwrap();
        assert_eq!((s.epochs, s.batch_size, s.sgd.momentum), (10, 64, 0.0));
        assert_eq!(s.schedule.lr(3999), 0.1);
        assert!((s.schedule.lr(4000) - 0.01).abs() < 1e-12);
        let m = TrainConfig::from_recipe(Recipe::SeedMomentum, 50_000, None, None, None).unwrap();
        assert_eq!(
            (m.epochs, m.batch_size, m.sgd.momentum, m.schedule.base_lr),
            (5, 64, 0.9, 0.01)
        );
        // A set smaller than the recipe's batch is one batch; an explicit
        // batch larger than the set, or a one-image set, is an error.
        let small = TrainConfig::from_recipe(Recipe::Default, 10, None, None, None).unwrap();
        assert_eq!(small.batch_size, 10);
        assert!(TrainConfig::from_recipe(Recipe::Default, 10, None, Some(16), None).is_err());
        assert!(TrainConfig::from_recipe(Recipe::Default, 1, None, None, None).is_err());
        let f = TrainConfig::from_recipe(Recipe::Finetune, 450, None, None, None).unwrap();
        assert_eq!(
            (f.epochs, f.batch_size, f.freeze_epochs, f.schedule.base_lr),
            (15, 32, 2, 0.01)
        );
        // The default: step decay, 390 steps per epoch, 100 epochs.
        let d = TrainConfig::from_recipe(Recipe::Default, 50_000, None, None, None).unwrap();
        assert_eq!((d.epochs, d.batch_size), (100, 128));
        let lr = |it: usize| d.schedule.lr(it);
        assert!((lr(0) - 0.1 / 780.0).abs() < 1e-12, "2-epoch warm-up");
        assert_eq!([lr(779), lr(19_499)], [0.1, 0.1]);
        assert!((lr(19_500) - 0.01).abs() < 1e-12 && (lr(29_249) - 0.01).abs() < 1e-12);
        assert!((lr(29_250) - 0.001).abs() < 1e-12 && (lr(38_999) - 0.001).abs() < 1e-12);
        assert_eq!(d.camera, Some(CameraAug::standard()));
        let l = TrainConfig::from_recipe(Recipe::Linear, 50_000, None, None, None).unwrap();
        assert_eq!((l.epochs, l.camera.clone()), (30, None));
        assert!((l.schedule.lr(390 * 15) - 0.05).abs() < 1e-3);
    }
}
