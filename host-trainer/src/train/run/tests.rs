//! Tests of the training loop, recipes and reports.

use super::*;
use crate::schedule::Decay;
use crate::train::DecayShape;

mod distill;

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
        TrainConfig::from_recipe(Recipe::Default, 64, Some(epochs), Some(16), Some(0.05)).unwrap();
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

/// Killed after epoch 1, then resumed twice: the same weights, metrics and
/// averages (`--ema`; `--swa-from 2`, which begins after the first resume)
/// as one straight run.
#[test]
fn resume_equals_uninterrupted_run() {
    for (ema, swa_from) in [(None, None), (Some(0.9), None), (None, Some(2))] {
        resume_matches_straight_run(TrainConfig {
            ema,
            swa_from,
            ..tiny_config(3)
        });
    }
}

fn resume_matches_straight_run(config: TrainConfig) {
    let train_set = crate::data::synthetic(64, 4, 1);
    let test_set = crate::data::synthetic(32, 4, 2);
    let cfg = || config.clone();
    let averaged = config.averaging().unwrap().is_some();
    let a = tempfile::tempdir().unwrap();
    let straight = run_cpu(cfg(), &train_set, &test_set, a.path(), false, None).unwrap();
    let b = tempfile::tempdir().unwrap();
    run_cpu(cfg(), &train_set, &test_set, b.path(), false, Some(1)).unwrap();
    run_cpu(cfg(), &train_set, &test_set, b.path(), true, Some(1)).unwrap();
    let resumed = run_cpu(cfg(), &train_set, &test_set, b.path(), true, None).unwrap();
    assert_eq!(weights(&straight.trainee), weights(&resumed.trainee));
    assert_eq!(straight.history.len(), 3);
    assert_eq!(resumed.history.len(), 3);
    for (x, y) in straight.history.iter().zip(&resumed.history) {
        assert_eq!(
            (x.train_loss, x.test_acc, x.raw_test_acc),
            (y.train_loss, y.test_acc, y.raw_test_acc)
        );
    }
    let with_raw: Vec<bool> = resumed
        .history
        .iter()
        .map(|m| m.raw_test_acc.is_some())
        .collect();
    let want = match (config.ema, config.swa_from) {
        (Some(_), _) => vec![true; 3],
        (_, Some(_)) => vec![false, true, true],
        _ => vec![false; 3],
    };
    assert_eq!(with_raw, want);
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
    // The checkpoint's straight and resumed tensors are the same bits.
    let ck = |d: &Path| load_checkpoint(&d.join("checkpoint.safetensors"), &Device::Cpu).unwrap();
    let (x, y) = (ck(a.path()), ck(b.path()));
    assert_eq!(x.tensors.len(), y.tensors.len());
    assert_eq!(x.weights_prefix() == "avg.", averaged);
    for (n, t) in &x.tensors {
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(t), v(&y.tensors[n]), "{n}");
    }
}

/// With `--ema` the run's result, the model a checkpoint gives for export
/// and the committed weights are the averages; resume takes the raw ones.
#[test]
fn an_averaging_run_evaluates_and_exports_its_averages() {
    let train_set = crate::data::synthetic(64, 4, 1);
    let test_set = crate::data::synthetic(32, 4, 2);
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        ema: Some(0.9),
        swa_from: None,
        ..tiny_config(2)
    };
    let out = run_cpu(cfg, &train_set, &test_set, dir.path(), false, None).unwrap();
    let p = dir.path().join("checkpoint.safetensors");
    let ck = load_checkpoint(&p, &Device::Cpu).unwrap();
    assert_eq!(ck.weights_prefix(), "avg.");
    let avg = model_from_checkpoint(&ck, &Device::Cpu).unwrap();
    let raw = raw_model_from_checkpoint(&ck, &Device::Cpu).unwrap();
    assert_eq!(weights(&avg), weights(&out.trainee));
    assert_ne!(weights(&raw), weights(&avg));
    let last = out.history.last().unwrap();
    let acc = evaluate(&avg.model, &test_set, 32, &Device::Cpu)
        .unwrap()
        .accuracy;
    assert_eq!((acc, out.test.accuracy), (last.test_acc, last.test_acc));
    let raw_acc = evaluate(&raw.model, &test_set, 32, &Device::Cpu)
        .unwrap()
        .accuracy;
    assert_eq!(Some(raw_acc), last.raw_test_acc);

    let w = dir.path().join("weights.safetensors");
    crate::checkpoint::save_weights(&w, &ck, "test rev").unwrap();
    let slim = load_checkpoint(&w, &Device::Cpu).unwrap();
    assert!(slim.tensors.keys().all(|n| n.starts_with("model.")));
    let from_slim = model_from_checkpoint(&slim, &Device::Cpu).unwrap();
    assert_eq!(weights(&from_slim), weights(&avg));

    // --ema cannot be added to or dropped from a run on resume, and
    // excludes --swa-from.
    let both = TrainConfig {
        ema: Some(0.9),
        swa_from: Some(1),
        ..tiny_config(2)
    };
    assert!(both.averaging().is_err());
    let late = TrainConfig {
        swa_from: Some(3),
        ..tiny_config(2)
    };
    let e = late.averaging().unwrap_err().to_string();
    assert!(e.contains("epochs 1 to 2"), "{e}");
    let err = run_cpu(
        tiny_config(2),
        &train_set,
        &test_set,
        dir.path(),
        true,
        None,
    )
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap();
    assert!(err.contains("only --epochs may change"), "{err}");
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
    // A longer run: the decay now ends at epoch 3, and the average of the
    // last quarter, not begun yet, moves from epoch 2 to 3.
    assert_eq!(tiny_config(2).swa_from, Some(2));
    let r = run_cpu(tiny_config(3), &train_set, &test_set, d.path(), true, None).unwrap();
    assert_eq!(r.history.len(), 3);
    assert!(r.history[2].lr < r.history[1].lr);
    assert_eq!(r.history[1].raw_test_acc, None);
    assert!(r.history[2].raw_test_acc.is_some());
    // Once begun, the average cannot move (8 epochs would start it at 7).
    let err = run_cpu(tiny_config(8), &train_set, &test_set, d.path(), true, None).unwrap_err();
    assert!(format!("{err:#}").contains("pass --swa-from 3"), "{err:#}");
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
    save_checkpoint(&path, &t, &opt, None, &meta).unwrap();
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
        let msg = format!(
            "{:#}",
            save_checkpoint(&path, &t, &opt, None, &meta).unwrap_err()
        );
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

/// The error of `--resume` on the run in `dir` (which must fail).
fn resume_error(dir: &Path, train_set: &Dataset, test_set: &Dataset) -> String {
    let e = run_cpu(tiny_config(3), train_set, test_set, dir, true, None).unwrap_err();
    format!("{e:#}")
}

/// A run of the toy sets interrupted after one epoch: its folder, its
/// checkpoint's path and the sets.
fn interrupted_run() -> (tempfile::TempDir, PathBuf, Dataset, Dataset) {
    let (train_set, test_set) = toy_sets();
    let dir = tempfile::tempdir().unwrap();
    one_epoch(dir.path(), &train_set, &test_set);
    let ckpt = dir.path().join("checkpoint.safetensors");
    (dir, ckpt, train_set, test_set)
}

/// `--init`: the backbone comes from the checkpoint, the head is new
/// and sized to the new classes; a frozen epoch moves only the head
/// (and the BN statistics); a later epoch moves everything. A
/// checkpoint of another architecture is an error naming it.
#[test]
fn init_copies_the_backbone_and_freezing_trains_only_the_head() {
    let (_src, init, _, _) = interrupted_run();
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
    let (dir, p, train_set, test_set) = interrupted_run();
    let full = load_checkpoint(&p, &Device::Cpu).unwrap();
    assert!(!full.weights_only());
    let w = dir.path().join("weights.safetensors");
    crate::checkpoint::save_weights(&w, &full, "test rev").unwrap();
    let slim = load_checkpoint(&w, &Device::Cpu).unwrap();
    assert!(slim.weights_only());
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
    let err = resume_error(dir.path(), &train_set, &test_set);
    assert!(err.contains("weights only"), "{err}");
}

#[test]
fn a_flipped_bit_in_a_checkpoint_is_caught_by_its_checksum() {
    let (dir, p, train_set, test_set) = interrupted_run();
    let mut bytes = fs::read(&p).unwrap();
    let last = bytes.len() - 3; // inside the last tensor's data
    bytes[last] ^= 0x40; // an exponent bit: the value stays finite
    fs::write(&p, &bytes).unwrap();
    let err = format!("{:#}", load_checkpoint(&p, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("damaged checkpoint") && err.contains("checksum"),
        "{err}"
    );
    let err = resume_error(dir.path(), &train_set, &test_set);
    assert!(
        err.contains("--resume") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn resume_refuses_another_training_set_and_warns_on_another_test_set() {
    let (dir, _, train_set, test_set) = interrupted_run();
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
    let (dir, _, train_set, test_set) = interrupted_run();
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
    let (dir, p, train_set, test_set) = interrupted_run();
    // Same run, lr 100 from here on (what a bad --lr does to a fresh run
    // from its first step).
    let mut cfg = tiny_config(3);
    cfg.schedule.base_lr = 100.0;
    cfg.schedule.warmup = 0;
    let mut ck = load_checkpoint(&p, &Device::Cpu).unwrap();
    ck.meta.config = cfg.clone();
    let t = model_from_checkpoint(&ck, &Device::Cpu).unwrap();
    let opt = Sgd::new(t.named_vars(), cfg.sgd);
    save_checkpoint(&p, &t, &opt, None, &ck.meta).unwrap();
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
    // The default: step decay, 390 steps per epoch, 200 epochs, the mean of
    // epochs 151-200 (the lr-0.001 phase, which starts at iteration 58,500).
    let d = TrainConfig::from_recipe(Recipe::Default, 50_000, None, None, None).unwrap();
    assert_eq!((d.epochs, d.batch_size, d.swa_from), (200, 128, Some(151)));
    let lr = |it: usize| d.schedule.lr(it);
    assert!((lr(0) - 0.1 / 780.0).abs() < 1e-12, "2-epoch warm-up");
    assert_eq!([lr(779), lr(38_999)], [0.1, 0.1]);
    assert!((lr(39_000) - 0.01).abs() < 1e-12 && (lr(58_499) - 0.01).abs() < 1e-12);
    assert!((lr(58_500) - 0.001).abs() < 1e-12 && (lr(77_999) - 0.001).abs() < 1e-12);
    let short = |e| TrainConfig::from_recipe(Recipe::Default, 50_000, Some(e), None, None).unwrap();
    assert_eq!(
        [1, 3, 5, 100].map(|e| short(e).swa_from),
        [Some(1), Some(3), Some(5), Some(76)]
    );
    assert_eq!(
        short(100).averaging().unwrap(),
        Some(crate::ema::Rule::SwaFrom(76))
    );
    assert_eq!(d.camera, Some(CameraAug::standard()));
    let l = TrainConfig::from_recipe(Recipe::Linear, 50_000, None, None, None).unwrap();
    assert_eq!((l.epochs, l.camera.clone()), (30, None));
    assert!((l.schedule.lr(390 * 15) - 0.05).abs() < 1e-3);
}

/// `--keep-head`: the head is copied too (a continuation on the same
/// classes), and a data set with other classes is refused, naming the
/// file and the tensor.
#[test]
fn keep_head_copies_the_head_and_needs_the_same_classes() {
    let (_src, init, _, _) = interrupted_run();
    let source =
        model_from_checkpoint(&load_checkpoint(&init, &Device::Cpu).unwrap(), &Device::Cpu)
            .unwrap();
    let mut cfg = tiny_config(1);
    cfg.init = Some(init.clone());
    cfg.keep_head = true;
    let t = Trainee::new(&cfg.arch, 99, &Device::Cpu).unwrap();
    let n = crate::transfer::init_from(&t, &cfg, &init, &Device::Cpu).unwrap();
    assert_eq!(n, t.named_vars().len());
    assert_eq!(weights(&t), weights(&source));
    cfg.keep_head = false;
    let fresh = Trainee::new(&cfg.arch, 99, &Device::Cpu).unwrap();
    crate::transfer::init_from(&fresh, &cfg, &init, &Device::Cpu).unwrap();
    let fc = |t: &Trainee| {
        weights(t)
            .into_iter()
            .find(|(k, _)| k == "fc.weight")
            .unwrap()
            .1
    };
    assert_ne!(fc(&fresh), fc(&source));

    cfg.keep_head = true;
    cfg.arch.classes = 3;
    let other = Trainee::new(&cfg.arch, 99, &Device::Cpu).unwrap();
    let e = format!(
        "{:#}",
        crate::transfer::init_from(&other, &cfg, &init, &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains(&init.display().to_string()) && e.contains("fc."),
        "{e}"
    );
}

/// A run checkpoint describes where its weights come from (the line that
/// export writes into the blob and the shipped checkpoint); a weights-only
/// checkpoint keeps its provenance line.
#[test]
fn a_checkpoint_says_where_its_weights_come_from() {
    let (_dir, p, _, _) = interrupted_run();
    let mut ck = load_checkpoint(&p, &Device::Cpu).unwrap();
    let o = ck.origin();
    assert!(
        o.starts_with("recipe default run, epoch 1 of 3, batch 16, lr 0.05 (milestones), camera augmentations"),
        "{o}"
    );
    assert!(
        !o.contains("mean of the weights") && !o.contains("started from"),
        "{o}"
    );
    ck.meta.config.init = Some(PathBuf::from("a/b.safetensors"));
    ck.meta.config.keep_head = true;
    assert!(ck
        .origin()
        .ends_with(", started from a/b.safetensors (its head kept)"));
    // Once the run keeps an average, that is what the weights are.
    ck.meta.config.swa_from = Some(1);
    let any = ck.tensors.values().next().unwrap().clone();
    ck.tensors.insert("avg.stem.conv.weight".into(), any);
    let o = ck.origin();
    assert!(
        o.contains(", mean of the weights after epochs 1-1, started from"),
        "{o}"
    );
    ck.provenance = Some("average of 2 checkpoints".into());
    assert_eq!(ck.origin(), "average of 2 checkpoints");
}

/// `--decay constant`: the peak rate after the warm-up, to the last step.
#[test]
fn constant_decay_keeps_the_peak_rate_after_the_warm_up() {
    let mut cfg =
        TrainConfig::from_recipe(Recipe::Default, 640, Some(10), Some(64), Some(0.04)).unwrap();
    cfg.set_decay(DecayShape::Constant, 640);
    let s = &cfg.schedule;
    assert_eq!(s.decay, Decay::Constant);
    assert_eq!(s.warmup, 20);
    assert!(s.lr(0) < 0.04 && s.lr(19) == 0.04 && s.lr(99) == 0.04);
}
