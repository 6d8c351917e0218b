//! `host-trainer`: trains Mini-ResNet on CIFAR-10 with candle.
//!
//! `cargo run -p host-trainer --release` with no arguments trains the
//! default recipe on the default data location.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

use host_trainer::train::{self, Recipe, RunOptions, TrainConfig};
use host_trainer::{bench, data, peer};

mod cli;
use cli::*;

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Before candle's first operation: the fast CPU ops' rayon pool, and
    // candle's own pool kept to the calling thread.
    let threads = match &cli.command {
        Some(Command::Bench(a)) => Some(a.threads),
        _ => None,
    };
    host_trainer::ops::configure_threads(threads)?;
    host_trainer::ops::on_worker(|| match cli.command {
        None => match Cli::parse_from(["host-trainer", "train", "--export", "shared"]).command {
            Some(Command::Train(a)) => run_train(a),
            _ => anyhow::bail!("internal error: default `train` arguments did not parse"),
        },
        Some(Command::Train(a)) => run_train(a),
        Some(Command::Eval(a)) => run_eval(a),
        Some(Command::Bench(a)) => run_bench(a),
        Some(Command::Export(a)) => run_export(a),
        Some(Command::Classify(a)) => run_classify(a),
        Some(Command::DeviceCheck(a)) => run_device_check(a),
        Some(Command::TfliteCheck(a)) => run_tflite_check(a),
        Some(Command::Average(a)) => run_average(a),
    })
}

fn run_average(a: AverageArgs) -> Result<()> {
    let device = train::device(&a.data.device)?;
    let mut ck = train::average::average_checkpoints(&a.checkpoints, &device)?;
    let mut what = ck.provenance.clone().unwrap_or_else(|| "average".into());
    if a.refresh_bn {
        let train_set = data::load(&data_source(&a.data)?, data::Split::Train)?;
        let n = train::bn_refresh::refresh_checkpoint(&mut ck, &train_set, a.bn_images, &device)?;
        what = format!("{what}, BN statistics recomputed on {n} training images");
    }
    let line = format!("{what}, by {}", host_trainer::ship::trainer_revision());
    train::checkpoint::save_weights(&a.out, &ck, &line)?;
    println!("{line}\nwritten to {} (weights only)", a.out.display());
    Ok(())
}

fn run_device_check(a: DeviceCheckArgs) -> Result<()> {
    let device = train::device(&a.device)?;
    let arch = a.arch.resolve()?;
    let n = 2 * a.batch_size;
    let data = match &a.data {
        Some(p) => data::load_limited(&data::detect(p)?, data::Split::Train, Some(n))?,
        None => data::synthetic(n, arch.classes, 1),
    };
    let backend = match a.stock {
        true => host_trainer::model::Backend::Stock,
        false => host_trainer::model::Backend::for_device(&device),
    };
    let t0 = std::time::Instant::now();
    let report = host_trainer::agreement::compare(&arch, &data, a.batch_size, &device, backend)?;
    println!(
        "CPU (custom ops) vs {} ({backend:?} ops): 2 training steps of {} images, {:.1} s",
        a.device,
        a.batch_size,
        t0.elapsed().as_secs_f64()
    );
    print!("{}", report.summary());
    let bad = report.failures();
    for r in &bad {
        eprintln!(
            "over tolerance: {} rel L2 {:.3e} > {:.0e}",
            r.name, r.rel_l2, r.tolerance
        );
    }
    anyhow::ensure!(
        report.passed(),
        "CPU and {} disagree: {} of {} comparisons over tolerance, top-1 classes {}/{} the same",
        a.device,
        bad.len(),
        report.rows.len(),
        report.same_top1,
        report.images
    );
    println!("agreement: PASS ({} tensors)", report.rows.len());
    Ok(())
}

fn data_source(a: &DataArgs) -> Result<data::Source> {
    data::resolve(a.data.as_deref(), a.val_split)
}

/// Exports `checkpoint` once to every destination in `outs`.
#[allow(clippy::too_many_arguments)]
fn export_checkpoint(
    checkpoint: &std::path::Path,
    outs: &[&str],
    quant: &QuantArgs,
    force: bool,
    src: &data::Source,
    train_set: &data::Dataset,
    test_set: &data::Dataset,
    device: &candle_core::Device,
) -> Result<()> {
    let job = host_trainer::ship::ExportJob {
        checkpoint,
        outs,
        options: host_trainer::export::ExportOptions {
            calib_images: quant.calib_images,
            calibration: quant.calibration,
            bias_correction: !quant.no_bias_correction,
            dataset: data::describe(src),
        },
        force,
        train_set,
        test_set,
    };
    host_trainer::ship::export_checkpoint(&job, device)
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
    let src = data_source(&a.data)?;
    let train_set = data::load_limited(&src, data::Split::Train, a.train_limit)?;
    let test_set = data::load_limited(&src, data::Split::Test, a.data.test_limit)?;
    let mut cfg =
        TrainConfig::from_recipe(a.recipe, train_set.len(), a.epochs, a.batch_size, a.lr)?;
    cfg.arch = arch;
    cfg.arch.classes = train_set.classes.len();
    if let Some(d) = a.decay {
        let shape = match d {
            DecayArg::Step => train::DecayShape::Step,
            DecayArg::Linear => train::DecayShape::Linear,
            DecayArg::Constant => train::DecayShape::Constant,
        };
        cfg.set_decay(shape, train_set.len());
    }
    match a.augment {
        Some(AugmentArg::Camera) => {
            (cfg.augment, cfg.camera) = (true, Some(train::CameraAug::standard()))
        }
        Some(AugmentArg::CameraLight) => {
            (cfg.augment, cfg.camera) = (true, Some(train::CameraAug::light()))
        }
        Some(AugmentArg::CropFlip) => (cfg.augment, cfg.camera) = (true, None),
        Some(AugmentArg::None) => (cfg.augment, cfg.camera) = (false, None),
        None => {}
    }
    cfg.init = a
        .init
        .as_deref()
        .map(host_trainer::ship::resolve_checkpoint);
    cfg.keep_head = a.keep_head;
    if !a.distill.is_empty() {
        let d = train::distill::DistillConfig {
            teachers: a
                .distill
                .iter()
                .map(|p| host_trainer::ship::resolve_checkpoint(p))
                .collect(),
            weight: a.distill_weight,
            temperature: a.distill_temperature,
        };
        d.validate()?;
        cfg.distill = Some(d);
    }
    if let Some(k) = a.freeze_epochs {
        cfg.freeze_epochs = k;
    }
    if a.ema.is_some() || a.swa_from.is_some() || a.no_average {
        cfg.ema = a.ema;
        cfg.swa_from = a.swa_from;
    }
    cfg.averaging()?;
    anyhow::ensure!(
        cfg.init.is_some() || (a.recipe != Recipe::Finetune && cfg.freeze_epochs == 0),
        "--recipe finetune and --freeze-epochs start from trained weights: add --init default (the shipped \
         model's checkpoint) or --init <run>/checkpoint.safetensors"
    );
    if let Some(table) = data::class_table(&train_set, &test_set) {
        eprint!("{table}");
    }
    cfg.seed = a.seed;
    let run_dir = a
        .run_dir
        .unwrap_or_else(|| PathBuf::from("runs").join(a.recipe.name()));
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
    let ck_path = run_dir.join("checkpoint.safetensors");
    let run_model = run_dir.join("model.bin").to_string_lossy().to_string();
    let outs: Vec<&str> = match a.export {
        ExportTarget::None => vec![],
        ExportTarget::Run => vec![&run_model],
        ExportTarget::Shared => vec![&run_model, "shared"],
    };
    if !outs.is_empty() {
        export_checkpoint(
            &ck_path, &outs, &a.quant, a.force, &src, &train_set, &test_set, &device,
        )?;
    }
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
    let src = data_source(&a.data)?;
    let test_set = data::load_limited(&src, data::Split::Test, a.data.test_limit)?;
    if a.camera {
        let m = host_trainer::classify::load_model(a.model.as_deref().unwrap_or("default"))?;
        let t0 = std::time::Instant::now();
        let report = host_trainer::camera::run(&m, &test_set, None, |pass| {
            eprintln!("  {pass} done ({:.0} s)", t0.elapsed().as_secs_f64())
        })?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", host_trainer::camera::format_report(&report));
        }
        return Ok(());
    }
    let float = match &a.checkpoint {
        Some(p) => {
            let ck = train::load_checkpoint(&host_trainer::ship::resolve_checkpoint(p), &device)?;
            Some((train::model_from_checkpoint(&ck, &device)?, ck.meta.epoch))
        }
        None => None,
    };
    match (&a.model, float) {
        (None, Some((t, epoch))) => {
            let ev = train::evaluate(&t.model, &test_set, 256, &device)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "epoch": epoch, "float_accuracy": ev.accuracy, "loss": ev.loss,
                        "images": test_set.len(), "per_class": ev.per_class(),
                    })
                );
            } else {
                println!("{}", train::format_confusion(&ev));
                println!(
                    "epoch {epoch}: float test accuracy {:.2}% on {} images (loss {:.4})",
                    ev.accuracy,
                    test_set.len(),
                    ev.loss
                );
            }
        }
        (Some(spec), Some((t, _))) => {
            let m = host_trainer::classify::load_model(spec)?;
            let cmp = host_trainer::export::compare(&t.model, &m, &test_set, &device)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&cmp)?);
            } else {
                println!("{}", cmp.report());
            }
        }
        (Some(spec), None) => {
            // No float checkpoint: measure int8, and show the float figures
            // recorded at export.
            let m = host_trainer::classify::load_model(spec)?;
            let ev = host_trainer::export::evaluate_int8(&m, &test_set)?;
            let int8 = ev.int8_accuracy;
            let model = m.model()?;
            let recorded = |k: &str| model.meta_value(k).and_then(|v| v.parse::<f64>().ok());
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "int8_accuracy": int8, "images": test_set.len(),
                        "int8_per_class": ev.int8_per_class, "classes": ev.classes,
                        "float_accuracy": recorded("float_accuracy"),
                        "top1_agreement": recorded("top1_agreement"),
                        "float_source": "recorded at export (pass --checkpoint to measure)",
                    })
                );
            } else {
                println!("{}", model.meta());
                print!("{}", ev.report());
                let pct = |k: &str| {
                    recorded(k).map_or_else(|| "not recorded".to_string(), |v| format!("{v:.2}%"))
                };
                println!(
                    "int8 accuracy {int8:.2}% on {} images; float {} and top-1 agreement {} as recorded at export \
                     (pass --checkpoint to measure them)",
                    test_set.len(),
                    pct("float_accuracy"),
                    pct("top1_agreement")
                );
            }
        }
        (None, None) => anyhow::bail!("give --checkpoint, --model, or both"),
    }
    Ok(())
}

fn run_export(a: ExportArgs) -> Result<()> {
    let tflite = match a.format {
        Some(f) => f == ExportFormat::Tflite,
        None => a.out.ends_with(".tflite"),
    };
    anyhow::ensure!(
        !tflite || a.out.ends_with(".tflite"),
        "--format tflite writes a TFLite file: give --out NAME.tflite (`{}` is not one)",
        a.out
    );
    anyhow::ensure!(
        tflite || a.out.ends_with(".bin") || a.out == "shared",
        "--out `{}`: give `shared`, NAME.bin or NAME.tflite",
        a.out
    );
    if let Some(from) = &a.from {
        anyhow::ensure!(
            tflite,
            "--from converts a model to TFLite: add --format tflite"
        );
        let owned = host_trainer::classify::load_model(from)?;
        host_trainer::tflite::write_tflite(&owned, std::path::Path::new(&a.out))?;
        return Ok(());
    }
    let checkpoint = a.checkpoint.context("--checkpoint or --from is required")?;
    let device = train::device(&a.data.device)?;
    let src = data_source(&a.data)?;
    let train_set = data::load_limited(&src, data::Split::Train, None)?;
    let test_set = data::load_limited(&src, data::Split::Test, a.data.test_limit)?;
    export_checkpoint(
        &checkpoint,
        &[a.out.as_str()],
        &a.quant,
        a.force,
        &src,
        &train_set,
        &test_set,
        &device,
    )
}

fn run_tflite_check(a: TfliteCheckArgs) -> Result<()> {
    let owned = host_trainer::classify::load_model(&a.model)?;
    let src = data_source(&a.data)?;
    let test_set = data::load_limited(&src, data::Split::Test, a.data.test_limit)?;
    let report =
        host_trainer::tflite::check::run(&owned, a.tflite.as_deref(), &test_set, &a.work_dir)?;
    anyhow::ensure!(
        report.differing.is_empty(),
        "TFLM and shared::model::run differ on {} of {} images",
        report.differing.len(),
        report.images
    );
    Ok(())
}

fn run_classify(a: ClassifyArgs) -> Result<()> {
    let owned = host_trainer::classify::load_model(&a.model)?;
    let mut classifier = host_trainer::classify::Classifier::new(&owned)?;
    let mut failed = 0;
    for path in &a.images {
        // One bad file is reported and the rest still classified.
        match classifier.classify_file(path) {
            Ok((class, confidence)) => {
                println!("{}: {class} ({confidence:.1}%)", path.display())
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                failed += 1;
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} images could not be classified",
        a.images.len()
    );
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.threads > 0 && a.runs > 0 && a.batch_size > 0,
        "--threads, --runs and --batch-size must be positive"
    );
    let python = a
        .python
        .as_deref()
        .map(peer::resolve_python)
        .unwrap_or_else(peer::default_python);
    let peer = match a.peer {
        Some(p) => p,
        None if a.device != "cpu" => peer::Peer::None,
        None if python.exists() => peer::Peer::Pytorch,
        None => {
            eprintln!(
                "note: no PyTorch comparison: {} is missing ({}; --peer none silences this)",
                python.display(),
                peer::SETUP_HINT
            );
            peer::Peer::None
        }
    };
    let script = peer::default_script();
    if peer == peer::Peer::Pytorch {
        peer::check_paths(&python, &script)?; // before the candle half, not after
    }
    let device = train::device(&a.device)?;
    let arch = a.arch.resolve()?;
    // candle first, then PyTorch: never both at once.
    let candle = bench::bench(&arch, a.batch_size, a.warmup, a.runs, &device)?;
    let mut peer_result = Vec::new();
    if peer == peer::Peer::Pytorch {
        for &channels_last in a.pytorch_layout.channels_last() {
            let result = peer::run_pytorch(&peer::PeerRun {
                python: &python,
                script: &script,
                arch: &arch,
                batch_size: a.batch_size,
                warmup: a.warmup,
                runs: a.runs,
                threads: a.threads,
                channels_last,
            })?;
            let layout = if channels_last {
                "channels-last"
            } else {
                "NCHW"
            };
            peer_result.push(bench::PeerLayout {
                layout: layout.into(),
                result,
            });
        }
    }
    let mut r = bench::BenchReport::new(&arch, &a.device, a.threads, a.warmup, candle, peer_result);
    if a.stock {
        r.stock = Some(bench::bench_backend(
            &arch,
            a.batch_size,
            a.warmup,
            a.runs,
            &device,
            host_trainer::model::Backend::Stock,
        )?);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.table());
    }
    Ok(())
}
