//! `host-trainer`: trains Mini-ResNet on CIFAR-10 with candle.
//!
//! `cargo run -p host-trainer --release` with no arguments trains the
//! default recipe on the default data location.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use host_trainer::model::ArchConfig;
use host_trainer::train::{self, Recipe, RunOptions, TrainConfig};
use host_trainer::{bench, data};

/// Train Mini-ResNet on CIFAR-10 (candle, CPU or CUDA).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train (or resume) a run; the default when no subcommand is given.
    Train(TrainArgs),
    /// Float accuracy of a checkpoint on the test set.
    Eval(EvalArgs),
    /// Training and inference images/s at batch 64 (medians).
    Bench(BenchArgs),
}

#[derive(Debug, Args, Clone)]
struct DataArgs {
    /// CIFAR-10 location: a folder of `*_batch*.bin`, `cifar-10-binary.tar.gz`,
    /// or image folders `train/<class>/*.jpg` + `test/<class>/*.jpg`.
    /// Default: $MINI_RESNET_DATA, else `../shared/data/cifar10-jpeg` next to
    /// the workspace, else the official tarball downloaded into the cache.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Use only N test images, spread evenly over the set (quick checks).
    #[arg(long)]
    test_limit: Option<usize>,
    /// Compute device: `cpu`, or `cuda` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Debug, Args, Clone)]
struct ArchArgs {
    /// Architecture preset.
    #[arg(long, value_enum, default_value_t = ArchPreset::Seed)]
    arch: ArchPreset,
    /// Stage widths, overriding the preset (e.g. `16,32,64,128`).
    #[arg(long, value_delimiter = ',')]
    widths: Option<Vec<usize>>,
    /// Blocks per stage, overriding the preset (e.g. `3,4,6,3`).
    #[arg(long, value_delimiter = ',')]
    blocks: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ArchPreset {
    /// The article's Mini-ResNet (with the stem max pool).
    Seed,
    /// The same without the stem max pool.
    NoMaxpool,
}

impl ArchArgs {
    fn resolve(&self) -> Result<ArchConfig> {
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
struct TrainArgs {
    /// Training recipe.
    #[arg(long, value_enum, default_value_t = Recipe::Default)]
    recipe: Recipe,
    /// Epochs (default: the recipe's).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size (default: the recipe's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate (default: the recipe's).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed for initialization, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run folder (checkpoint, metrics, plots). Default: `runs/<recipe>`.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Use only N training images, spread evenly over the set (quick checks).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    arch: ArchArgs,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Checkpoint to evaluate (`<run>/checkpoint.safetensors`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Compute device.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    arch: ArchArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => match Cli::parse_from(["host-trainer", "train"]).command {
            Some(Command::Train(a)) => run_train(a),
            _ => anyhow::bail!("internal error: default `train` arguments did not parse"),
        },
        Some(Command::Train(a)) => run_train(a),
        Some(Command::Eval(a)) => run_eval(a),
        Some(Command::Bench(a)) => run_bench(a),
    }
}

/// The data source for `--data`, or the default chain.
fn data_source(arg: &Option<PathBuf>) -> Result<data::Source> {
    if let Some(p) = arg {
        return data::detect(p);
    }
    if let Some(p) = std::env::var_os("MINI_RESNET_DATA") {
        return data::detect(&PathBuf::from(p)).context("$MINI_RESNET_DATA");
    }
    let team = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cifar10-jpeg");
    if team.join("train").is_dir() {
        eprintln!("data: {}", team.display());
        return data::detect(&team);
    }
    let dir = data::default_cache_dir();
    eprintln!(
        "data: no --data given; using the official CIFAR-10 binary release in {}",
        dir.display()
    );
    let tarball = data::download(
        data::CIFAR10_URL,
        data::CIFAR10_MD5,
        &dir,
        "cifar-10-binary.tar.gz",
    )?;
    Ok(data::Source::Tarball(tarball))
}

fn load_split(
    src: &data::Source,
    split: data::Split,
    limit: Option<usize>,
) -> Result<data::Dataset> {
    let t0 = std::time::Instant::now();
    let mut ds = data::load(src, split)?;
    if let Some(n) = limit {
        ds = ds.subsample(n);
    }
    eprintln!(
        "loaded {} {:?} images in {:.1} s",
        ds.len(),
        split,
        t0.elapsed().as_secs_f64()
    );
    Ok(ds)
}

fn run_train(a: TrainArgs) -> Result<()> {
    let device = train::device(&a.data.device)?;
    let arch = a.arch.resolve()?;
    eprintln!(
        "model: Mini-ResNet widths {:?} blocks {:?} maxpool {}: {} parameters, {:.2} M MACs per image",
        arch.widths,
        arch.blocks,
        arch.maxpool,
        arch.parameters(),
        arch.macs() as f64 / 1e6
    );
    let src = data_source(&a.data.data)?;
    let train_set = load_split(&src, data::Split::Train, a.train_limit)?;
    let test_set = load_split(&src, data::Split::Test, a.data.test_limit)?;
    let mut cfg =
        TrainConfig::from_recipe(a.recipe, train_set.len(), a.epochs, a.batch_size, a.lr)?;
    cfg.arch = arch;
    cfg.seed = a.seed;
    let run_dir = a.run_dir.unwrap_or_else(|| {
        PathBuf::from("runs").join(
            serde_json::to_value(a.recipe)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        )
    });
    eprintln!("run folder: {}", run_dir.display());
    let opts = RunOptions {
        run_dir: run_dir.clone(),
        resume: a.resume,
        eval_batch: 256,
        stop_after: None,
        progress: !a.quiet,
    };
    let t0 = std::time::Instant::now();
    let out = train::train(cfg.clone(), &train_set, &test_set, &opts, &device)?;
    let wall = t0.elapsed().as_secs_f64();
    println!("{}", train::format_confusion(&out.test));
    let epochs = out.history.len();
    let reference = match (cfg.recipe, epochs) {
        (_, 20) => format!(
            "article, Momentum 20 epochs: {:.2}%",
            train::ARTICLE_MOMENTUM_20
        ),
        _ => format!(
            "article, Momentum 5 epochs: {:.2}%",
            train::ARTICLE_MOMENTUM_5
        ),
    };
    println!(
        "test accuracy after {epochs} epochs ({:?}): {:.2}%   [{reference}]\nwall time {:.0} s; outputs in {}",
        cfg.recipe,
        out.test.accuracy,
        wall,
        run_dir.display()
    );
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let device = train::device(&a.data.device)?;
    let ck = train::load_checkpoint(&a.checkpoint, &device)?;
    let t = train::model_from_checkpoint(&ck, &device)?;
    let src = data_source(&a.data.data)?;
    let test_set = load_split(&src, data::Split::Test, a.data.test_limit)?;
    let ev = train::evaluate(&t.model, &test_set, 256, &device)?;
    if a.json {
        let per: Vec<f64> = ev.per_class();
        println!(
            "{}",
            serde_json::json!({
                "checkpoint": a.checkpoint,
                "epoch": ck.meta.epoch,
                "float_accuracy": ev.accuracy,
                "loss": ev.loss,
                "images": test_set.len(),
                "per_class": per,
            })
        );
    } else {
        println!("{}", train::format_confusion(&ev));
        println!(
            "{}: epoch {}, float test accuracy {:.2}% on {} images (loss {:.4})",
            a.checkpoint.display(),
            ck.meta.epoch,
            ev.accuracy,
            test_set.len(),
            ev.loss
        );
    }
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    let device = train::device(&a.device)?;
    let arch = a.arch.resolve()?;
    let r = bench::bench(&arch, a.batch_size, a.warmup, a.runs, &device)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "candle {} batch {}: train {:.1} images/s ({:.2} GFLOP/s), inference {:.1} images/s (median of {} runs)",
            a.device, r.batch_size, r.train_images_per_sec, r.train_gflops, r.infer_images_per_sec, r.runs
        );
    }
    Ok(())
}
