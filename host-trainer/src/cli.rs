//! The command line of `host-trainer`: subcommands and their options
//! (clap), and the architecture options' resolution.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use host_trainer::model::ArchConfig;
use host_trainer::peer;
use host_trainer::train::Recipe;

/// Train Mini-ResNet on CIFAR-10 (candle, CPU or CUDA).
#[derive(Debug, Parser)]
#[command(version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Train (or resume) a run; the default when no subcommand is given.
    Train(TrainArgs),
    /// Float accuracy of a checkpoint on the test set.
    Eval(EvalArgs),
    /// Training and inference images/s at batch 64 (medians).
    Bench(BenchArgs),
    /// Quantize a checkpoint to int8 and export it (into `shared` or a file).
    Export(ExportArgs),
    /// Classify JPEG/PNG images of any size with an int8 model, through the
    /// firmware's path (RGB888 frame → shared::preprocess → shared::model).
    Classify(ClassifyArgs),
    /// Check that a device (CUDA) computes what the CPU does: two training
    /// steps and an eval pass, compared tensor by tensor.
    DeviceCheck(DeviceCheckArgs),
    /// Run the test set through TensorFlow Lite Micro (Python, venv made on
    /// demand in tflite/.venv) and through shared::model::run; compare the
    /// int8 logits byte for byte (docs/tflite.md).
    TfliteCheck(TfliteCheckArgs),
    /// Average the weights of several checkpoints of one architecture (SWA),
    /// e.g. a run's per-epoch checkpoints of its last phase, into a
    /// weights-only checkpoint for eval/export.
    Average(AverageArgs),
}

#[derive(Debug, Args)]
pub(crate) struct AverageArgs {
    /// The averaged checkpoint to write (weights only: not resumable).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// The checkpoints to average (at least two).
    #[arg(required = true, num_args = 2..)]
    pub(crate) checkpoints: Vec<PathBuf>,
    /// Recompute the BN running statistics of the averaged weights on
    /// training images (no augmentation) instead of averaging the
    /// checkpoints' own (SWA's BN update).
    #[arg(long)]
    pub(crate) refresh_bn: bool,
    /// Training images for --refresh-bn (spread evenly over the set).
    #[arg(long, default_value_t = 50_000, requires = "refresh_bn")]
    pub(crate) bn_images: usize,
    #[command(flatten)]
    pub(crate) data: DataArgs,
}

#[derive(Debug, Args)]
pub(crate) struct DeviceCheckArgs {
    /// Device to compare with the CPU.
    #[arg(long, default_value = "cuda")]
    pub(crate) device: String,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch_size: usize,
    /// Take the batches from this CIFAR-10 location (as `train --data`);
    /// default: synthetic images (`data::synthetic`).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Use candle's stock ops on the device even where it has faster ones
    /// (with `--device cpu`: checks the custom CPU ops against stock candle).
    #[arg(long)]
    pub(crate) stock: bool,
    #[command(flatten)]
    pub(crate) arch: ArchArgs,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct QuantArgs {
    /// Training images used to calibrate activation ranges (and the input
    /// means of the bias correction). 3000 rather than 1000: the 99.999th
    /// percentile of 1000 images' samples rests on about five values.
    #[arg(long, default_value_t = 3000)]
    pub(crate) calib_images: usize,
    /// Leave out the bias correction of weight quantization (each conv
    /// and FC bias minus the mean output error its int8 weights make on
    /// the calibration images). On the 100-epoch model it raised top-1
    /// agreement from 98.94% to 99.00% (3000 images) and from 98.87% to
    /// 99.01% (1000).
    #[arg(long)]
    pub(crate) no_bias_correction: bool,
    /// Range estimator: `minmax` or `percentile:P`. The default was chosen by
    /// measurement on the seed-momentum model (10,000 test images): top-1
    /// agreement 98.24% with `percentile:99.999` on 1000 images, against
    /// 97.94% (minmax, 500) and 97.82% (minmax, 2000).
    #[arg(long, default_value = "percentile:99.999")]
    pub(crate) calibration: host_trainer::quantize::Calibration,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// Checkpoint to export (`<run>/checkpoint.safetensors`, or `default`
    /// for the float checkpoint committed with the shipped model).
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Convert this int8 model instead (a `.bin` file, or `default` for the
    /// one in `shared`) to `--format tflite`: no data set needed.
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// `bin` (the blob) or `tflite` (TensorFlow Lite, docs/tflite.md);
    /// default: `tflite` for an `--out` ending in `.tflite`.
    #[arg(long, value_enum)]
    pub(crate) format: Option<ExportFormat>,
    /// `shared` (replace the model committed in
    /// `shared/src/model/generated/`, if the new one is at least as
    /// accurate), a `.bin` or a `.tflite` file path.
    #[arg(long, default_value = "shared")]
    pub(crate) out: String,
    /// Replace the shipped model even with a less accurate one.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) quant: QuantArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
}

/// File format of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ExportFormat {
    /// The model blob `shared` reads.
    Bin,
    /// TensorFlow Lite flatbuffer (schema v3) for TFLite Micro.
    Tflite,
}

#[derive(Debug, Args)]
pub(crate) struct TfliteCheckArgs {
    /// Int8 model: a `.bin` file, or `default` for the one in `shared`.
    #[arg(long, default_value = "default")]
    pub(crate) model: String,
    /// The `.tflite` file to check against it; default: the model exported
    /// afresh (`export --from MODEL --format tflite`) into the work folder.
    #[arg(long)]
    pub(crate) tflite: Option<PathBuf>,
    /// Folder for the exchanged files (inputs, outputs, the exported model).
    #[arg(long, default_value = "target/tflite-check")]
    pub(crate) work_dir: PathBuf,
    #[command(flatten)]
    pub(crate) data: DataArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ClassifyArgs {
    /// Int8 model: a `.bin` file, or `default` for the one in `shared`.
    #[arg(long, default_value = "default")]
    pub(crate) model: String,
    /// Images (JPEG or PNG, any size: a shorter side outside 32 to 4096
    /// pixels is resized into that range before the centre crop). A file
    /// that cannot be read is reported, the others still classified, and
    /// the exit status is then non-zero.
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct DataArgs {
    /// CIFAR-10 location: a folder of `*_batch*.bin`, `cifar-10-binary.tar.gz`,
    /// or image folders `train/<class>/*.jpg` + `test/<class>/*.jpg`.
    /// Default: $MINI_RESNET_DATA, else `../shared/data/cifar10-jpeg` next to
    /// the workspace, else the official tarball downloaded into the cache.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Use only N test images, spread evenly over the set (quick checks).
    #[arg(long)]
    pub(crate) test_limit: Option<usize>,
    /// For a folder of `<class>/` folders: the share of each class's images
    /// held out as the test split (deterministic; default 0.2).
    #[arg(long)]
    pub(crate) val_split: Option<f64>,
    /// Compute device: `cpu`, or `cuda` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct ArchArgs {
    /// Architecture preset.
    #[arg(long, value_enum, default_value_t = ArchPreset::Seed)]
    pub(crate) arch: ArchPreset,
    /// Stage widths, overriding the preset (e.g. `16,32,64,128`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) widths: Option<Vec<usize>>,
    /// Blocks per stage, overriding the preset (e.g. `3,4,6,3`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) blocks: Option<Vec<usize>>,
}

/// `train --decay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DecayArg {
    /// ×0.1 at 50% and 75% of the iterations.
    Step,
    /// Linear to 0.
    Linear,
    /// The peak rate throughout, after the warm-up (a phase to average
    /// with --swa-from).
    Constant,
}

/// `train --augment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AugmentArg {
    /// Random crop + flip and the camera augmentations (zoom, exposure,
    /// blur, noise, RGB565 rounding, cutout).
    Camera,
    /// The same at half the probabilities, without cutout.
    CameraLight,
    /// Random crop + flip only.
    CropFlip,
    /// None.
    None,
}

/// Where `train` puts the int8 model when it finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ExportTarget {
    /// `<run>/model.bin` and the model committed in `shared`.
    Shared,
    /// `<run>/model.bin` only.
    Run,
    /// No export.
    None,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum ArchPreset {
    /// The article's Mini-ResNet (with the stem max pool).
    Seed,
    /// The same without the stem max pool.
    NoMaxpool,
}

impl ArchArgs {
    pub(crate) fn resolve(&self) -> Result<ArchConfig> {
        let mut a = match self.arch {
            ArchPreset::Seed => ArchConfig::seed(),
            ArchPreset::NoMaxpool => ArchConfig::no_maxpool(),
        };
        if let Some(w) = &self.widths {
            a.widths = w.clone();
        }
        if let Some(b) = &self.blocks {
            a.blocks = b.clone();
        }
        a.validate()?;
        Ok(a)
    }
}

#[derive(Debug, Args, Clone)]
pub(crate) struct TrainArgs {
    /// Training recipe.
    #[arg(long, value_enum, default_value_t = Recipe::Default)]
    pub(crate) recipe: Recipe,
    /// Epochs (default: the recipe's).
    #[arg(long)]
    pub(crate) epochs: Option<usize>,
    /// Batch size (default: the recipe's).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Peak learning rate (default: the recipe's).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Replace the recipe's learning-rate decay (for a like-for-like
    /// comparison): `step` (×0.1 at 50% and 75%), `linear` (to 0) or
    /// `constant`.
    #[arg(long, value_enum)]
    pub(crate) decay: Option<DecayArg>,
    /// Replace the recipe's augmentations (`default` and `finetune`:
    /// camera; the others: crop-flip).
    #[arg(long, value_enum)]
    pub(crate) augment: Option<AugmentArg>,
    /// Keep an exponential moving average of the weights with this decay
    /// per step (e.g. 0.999) and evaluate, export and ship the average; the
    /// log shows the raw weights' test accuracy beside it.
    #[arg(long, conflicts_with_all = ["swa_from", "no_average"])]
    pub(crate) ema: Option<f64>,
    /// From this epoch (1-based) on, average the weights at the end of
    /// every epoch (stochastic weight averaging) and evaluate, export and
    /// ship the average; the log shows the raw weights' test accuracy
    /// beside it.
    #[arg(long, conflicts_with = "no_average")]
    pub(crate) swa_from: Option<usize>,
    /// Keep no average of the weights (the `default` recipe averages its
    /// last quarter of epochs): evaluate and export the raw weights.
    #[arg(long)]
    pub(crate) no_average: bool,
    /// Seed for initialization, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Run folder (checkpoint, metrics, plots). Default: `runs/<recipe>`.
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its last checkpoint.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Start from this checkpoint's backbone (`default`: the float
    /// checkpoint of the shipped model), with a new head for the data set's
    /// classes.
    #[arg(long)]
    pub(crate) init: Option<PathBuf>,
    /// With --init: keep the checkpoint's FC head as well, to continue
    /// training it on the same classes (e.g. a lower-rate phase whose
    /// weights are averaged, from the shipped checkpoint).
    #[arg(long, requires = "init")]
    pub(crate) keep_head: bool,
    /// Distil from these teacher checkpoints (`default`: the shipped
    /// model's): the loss adds the KL divergence to the teachers' mean
    /// softened prediction, which with camera augmentations the teachers
    /// make on the clean view of each image.
    #[arg(long, num_args = 1..)]
    pub(crate) distill: Vec<PathBuf>,
    /// With --distill: the weight of the distillation term (the label term
    /// gets 1 minus it).
    #[arg(long, default_value_t = 0.9, requires = "distill")]
    pub(crate) distill_weight: f64,
    /// With --distill: the softening temperature of both distributions.
    #[arg(long, default_value_t = 4.0, requires = "distill")]
    pub(crate) distill_temperature: f64,
    /// Epochs at the start that train only the new head (default: the
    /// recipe's; `finetune` uses 2).
    #[arg(long)]
    pub(crate) freeze_epochs: Option<usize>,
    /// Use only N training images, spread evenly over the set (quick checks).
    #[arg(long)]
    pub(crate) train_limit: Option<usize>,
    /// Hide progress bars.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Where to export the int8 model at the end: `run` (`<run>/model.bin`),
    /// `shared` (also replace the shipped model, if the new one is at least
    /// as accurate on the test set) or `none`. Without a subcommand,
    /// `host-trainer` trains with `--export shared`.
    #[arg(long, value_enum, default_value_t = ExportTarget::Run)]
    pub(crate) export: ExportTarget,
    /// With `--export shared`: replace the shipped model even with a less
    /// accurate one.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) quant: QuantArgs,
    #[command(flatten)]
    pub(crate) arch: ArchArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
}

#[derive(Debug, Args)]
pub(crate) struct EvalArgs {
    /// Float checkpoint (`<run>/checkpoint.safetensors`, or `default` for
    /// the one committed with the shipped model).
    #[arg(long, required_unless_present = "model")]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Int8 model: a `.bin` file, or `default` for the one in `shared`. With
    /// --checkpoint too, float and int8 are compared image by image.
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Camera-realism benchmark of the int8 --model: the test images as
    /// 160x120 RGB565 frames through the board's preprocessing, clean and
    /// with 7 CIFAR-10-C corruptions at severities 1, 3 and 5 (22 passes;
    /// --test-limit makes it shorter).
    #[arg(long, requires = "model")]
    pub(crate) camera: bool,
    #[command(flatten)]
    pub(crate) data: DataArgs,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch_size: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub(crate) runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: usize,
    /// Threads for both candle (the fast ops' pool) and PyTorch.
    #[arg(long, default_value_t = 2)]
    pub(crate) threads: usize,
    /// Framework to compare with, run after candle [default: pytorch when
    /// bench/.venv exists (`bash bench/setup.sh`), otherwise none].
    #[arg(long, value_enum)]
    pub(crate) peer: Option<peer::Peer>,
    /// Python of the PyTorch peer [default: bench/.venv/bin/python in the workspace].
    #[arg(long)]
    pub(crate) python: Option<PathBuf>,
    /// PyTorch memory format(s): `best` runs NCHW and channels-last (NHWC)
    /// and compares with the faster of the two for each figure.
    #[arg(long, value_enum, default_value_t = peer::Layouts::Best)]
    pub(crate) pytorch_layout: peer::Layouts,
    /// Also time candle's stock ops (no custom CPU ops), for the speed-up.
    #[arg(long)]
    pub(crate) stock: bool,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    #[command(flatten)]
    pub(crate) arch: ArchArgs,
}
