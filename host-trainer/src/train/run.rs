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
    load_checkpoint, model_from_checkpoint, raw_model_from_checkpoint, save_checkpoint,
    write_atomic, Checkpoint, CheckpointMeta, DataFingerprint,
};
use crate::data::Dataset;
use crate::distill::{distill_loss, mixed_loss, Teachers};
use crate::ema::RunningAverage;
use crate::model::{ArchConfig, MiniResNet};
use crate::optim::Sgd;
use crate::resident::Batches;
use crate::train::{plot_learning_curve, write_confusion, write_metrics, Recipe, TrainConfig};

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
    /// Test accuracy (%), one pass, no test-time augmentation (of the
    /// averaged weights in a run with `--ema` or `--swa-from`, once they
    /// exist).
    pub test_acc: f64,
    /// Learning rate at the last step of the epoch.
    pub lr: f64,
    /// Wall time of the training part of the epoch, seconds.
    pub seconds: f64,
    /// Training throughput.
    pub images_per_sec: f64,
    /// With an average: the test accuracy (%) of the raw weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_test_acc: Option<f64>,
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
    /// The trained model (its weight averages in a run with `--ema` or
    /// `--swa-from`).
    pub trainee: Trainee,
    /// Metrics of every epoch so far.
    pub history: Vec<EpochMetrics>,
    /// Final test evaluation.
    pub test: Evaluation,
}

/// Where a run stands: the model, its optimizer, its weight averages and
/// what is done.
struct RunState {
    trainee: Trainee,
    opt: Sgd,
    avg: Option<RunningAverage>,
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
                "init: {n} tensors from {}, {}{}",
                init.display(),
                if cfg.keep_head {
                    "its head kept".to_string()
                } else {
                    format!("a new head for {} classes", cfg.arch.classes)
                },
                match cfg.freeze_epochs {
                    0 => String::new(),
                    k => format!("; epochs 1-{k} train only the head"),
                }
            );
        }
        let opt = Sgd::new(trainee.named_vars(), cfg.sgd);
        let avg = cfg
            .averaging()?
            .map(|rule| RunningAverage::new(&trainee, rule))
            .transpose()?;
        return Ok(RunState {
            trainee,
            opt,
            avg,
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
    check_resume_config(&ck.meta.config, cfg, ck.meta.epoch)?;
    ensure!(
        !ck.weights_only(),
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
    let trainee = raw_model_from_checkpoint(&ck, device)?;
    let avg = cfg
        .averaging()?
        .map(|rule| RunningAverage::restore(&trainee, rule, &ck.tensors, ck.meta.epoch))
        .transpose()
        .with_context(|| format!("--resume: {}", ckpt_path.display()))?;
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
        avg,
        history: ck.meta.history,
        iteration: ck.meta.iteration,
        epoch: ck.meta.epoch,
    })
}

/// `--resume` may change `--epochs` (and with it the schedule's length:
/// decay and warm-up follow from the epoch count, and so does the first
/// epoch of the `default` recipe's average, as long as that average has
/// not begun after `completed` epochs), nothing else.
fn check_resume_config(saved: &TrainConfig, cfg: &TrainConfig, completed: usize) -> Result<()> {
    let same_schedule_kind = std::mem::discriminant(&saved.schedule.decay)
        == std::mem::discriminant(&cfg.schedule.decay)
        && saved.schedule.base_lr == cfg.schedule.base_lr;
    let same_average_kind = saved.swa_from.is_some() == cfg.swa_from.is_some();
    ensure!(
        same_schedule_kind
            && same_average_kind
            && TrainConfig {
                epochs: cfg.epochs,
                schedule: cfg.schedule.clone(),
                swa_from: cfg.swa_from,
                ..saved.clone()
            } == *cfg,
        "--resume: the options differ from the run's saved configuration (only --epochs may change)\n saved: {}\n given: {}",
        serde_json::to_string(saved)?,
        serde_json::to_string(cfg)?
    );
    if let (Some(old), Some(new)) = (saved.swa_from, cfg.swa_from) {
        ensure!(
            old == new || completed < old.min(new),
            "--resume: the run averages the weights of epochs {old} on and has completed {completed}, \
             so the average can no longer start at epoch {new}: pass --swa-from {old}"
        );
    }
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
    let teachers = cfg
        .distill
        .as_ref()
        .map(|d| Teachers::load(d, cfg.arch.classes, device))
        .transpose()?;
    while run.epoch < last_epoch {
        let m = train_epoch(
            &cfg,
            &mut run,
            teachers.as_ref(),
            &batches,
            train_set.len(),
            opts,
            device,
        )?;
        if let Some(avg) = run.avg.as_mut() {
            avg.after_epoch(&run.trainee, run.epoch + 1)?;
        }
        let (test, raw_test_acc) = evaluate_run(&mut run, test_set, opts.eval_batch, device)?;
        let m = EpochMetrics {
            test_loss: test.loss,
            test_acc: test.accuracy,
            raw_test_acc,
            ..m
        };
        let raw = raw_test_acc.map_or(String::new(), |a| format!(" (raw weights {a:.2}%)"));
        eprintln!(
            "epoch {:>3}/{}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}%{raw} | lr {:.5} | {:.0} s, {:.0} img/s",
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
            run.avg.as_ref(),
            &meta,
        )?;
        write_epoch_outputs(&opts.run_dir, &run.history, cfg.recipe)?;
    }
    // The averaged weights are the run's result.
    if let Some(avg) = run.avg.as_mut() {
        avg.swap(&run.trainee)?;
    }
    let test = evaluate(&run.trainee.model, test_set, opts.eval_batch, device)?;
    write_confusion(&opts.run_dir, &test)?;
    Ok(TrainOutcome {
        trainee: run.trainee,
        history: run.history,
        test,
    })
}

/// The test evaluation of a run's model: of its weight averages if it keeps
/// them, with the raw weights' accuracy beside it.
fn evaluate_run(
    run: &mut RunState,
    test_set: &Dataset,
    batch: usize,
    device: &Device,
) -> Result<(Evaluation, Option<f64>)> {
    let raw = evaluate(&run.trainee.model, test_set, batch, device)?;
    let Some(avg) = run.avg.as_mut().filter(|a| a.started()) else {
        return Ok((raw, None));
    };
    avg.swap(&run.trainee)?;
    let ev = evaluate(&run.trainee.model, test_set, batch, device);
    avg.swap(&run.trainee)?;
    Ok((ev?, Some(raw.accuracy)))
}

/// One epoch of training steps; the returned metrics lack the test figures.
fn train_epoch(
    cfg: &TrainConfig,
    run: &mut RunState,
    teachers: Option<&Teachers>,
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
        let (loss, logits, y) = step_loss(cfg, &run.trainee, teachers, batches, idx, epoch)?;
        sums.add(&loss, &logits, &y)?;
        let grads = loss.backward()?;
        run.opt
            .step_where(&grads, lr, |n| crate::transfer::trains(cfg, epoch, n))?;
        if let Some(avg) = run.avg.as_mut() {
            avg.after_step(&run.trainee, run.iteration)?;
        }
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
        raw_test_acc: None,
    })
}

/// The training loss of the batch `idx` (label smoothing, and with
/// `teachers` the distillation term on the clean view, see
/// [`crate::distill`]), with the student's logits and the labels.
fn step_loss(
    cfg: &TrainConfig,
    student: &Trainee,
    teachers: Option<&Teachers>,
    batches: &Batches,
    idx: &[usize],
    epoch: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let camera = cfg.camera.as_ref().filter(|_| cfg.augment);
    let clean_view = || batches.batch(idx, cfg.augment.then_some((cfg.seed, epoch)));
    let (x, y) = match camera {
        Some(cam) => batches.camera_batch(idx, cam, cfg.seed, epoch)?,
        None => clean_view()?,
    };
    let logits = student.model.forward_t(&x, true)?;
    let loss = smoothed_cross_entropy(&logits, &y, cfg.label_smoothing)?;
    let (Some(teachers), Some(d)) = (teachers, &cfg.distill) else {
        return Ok((loss, logits, y));
    };
    let targets = match camera {
        Some(_) => teachers.soft_targets(&clean_view()?.0)?,
        None => teachers.soft_targets(&x)?,
    };
    let kd = distill_loss(&logits, &targets, d.temperature)?;
    Ok((mixed_loss(&loss, &kd, d.weight)?, logits, y))
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

#[cfg(test)]
mod tests;
