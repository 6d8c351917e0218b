//! Fine-tuning from the shipped model against training from scratch, on a
//! small 3-class set built from CIFAR-10 (150 training and 100 test images
//! per class, written as 48x48 JPEG folders so that they go through the
//! board's preprocessing like a user's own photos).
//!
//! Needs the CIFAR-10 JPEG folders (`$MINI_RESNET_DATA`, else
//! `../shared/data/cifar10-jpeg` beside the workspace) and the committed
//! float checkpoint, so it is ignored in CI:
//!
//! ```sh
//! cargo test -p host-trainer --release --test finetune -- --ignored --nocapture
//! ```

use std::path::{Path, PathBuf};

use candle_core::Device;
use host_trainer::data::{self, Split};
use host_trainer::train::{self, Recipe, RunOptions, TrainConfig};

const CLASSES: [&str; 3] = ["airplane", "cat", "ship"];

fn cifar_folders() -> PathBuf {
    std::env::var_os("MINI_RESNET_DATA").map_or_else(data::team_folders, PathBuf::from)
}

/// `per` images of each of [`CLASSES`] from `split`, enlarged to 48x48.
fn write_split(src: &Path, dst: &Path, split: &str, per: usize) {
    for class in CLASSES {
        let from = src.join(split).join(class);
        let to = dst.join(split).join(class);
        std::fs::create_dir_all(&to).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&from)
            .unwrap_or_else(|e| panic!("{}: {e}", from.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(per) {
            let img = image::open(f).unwrap().to_rgb8();
            let big = image::imageops::resize(&img, 48, 48, image::imageops::FilterType::Triangle);
            big.save(to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

fn accuracy(
    mut cfg: TrainConfig,
    init: Option<PathBuf>,
    train: &data::Dataset,
    test: &data::Dataset,
) -> f64 {
    cfg.arch.classes = CLASSES.len();
    cfg.init = init;
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        run_dir: dir.path().to_path_buf(),
        resume: false,
        eval_batch: 128,
        stop_after: None,
        progress: false,
    };
    train::train(cfg, train, test, &opts, &Device::Cpu)
        .unwrap()
        .test
        .accuracy
}

#[test]
#[ignore = "needs the CIFAR-10 JPEG folders and about a minute"]
fn finetuning_from_the_shipped_model_beats_training_from_scratch() {
    let src = cifar_folders();
    let tmp = tempfile::tempdir().unwrap();
    write_split(&src, tmp.path(), "train", 150);
    write_split(&src, tmp.path(), "test", 100);
    let source = data::detect(tmp.path()).unwrap();
    let train_set = data::load(&source, Split::Train).unwrap();
    let test_set = data::load(&source, Split::Test).unwrap();
    assert_eq!((train_set.len(), test_set.len()), (450, 300));
    assert_eq!(train_set.classes, CLASSES);

    let finetune =
        TrainConfig::from_recipe(Recipe::Finetune, train_set.len(), None, None, None).unwrap();
    let tuned = accuracy(
        finetune.clone(),
        Some(host_trainer::ship::shipped_checkpoint()),
        &train_set,
        &test_set,
    );
    // Scratch: the same epochs, batch and augmentations, no frozen epochs,
    // and the default recipe's higher learning rate (fairer to it).
    let mut scratch =
        TrainConfig::from_recipe(Recipe::Finetune, train_set.len(), None, None, Some(0.1)).unwrap();
    scratch.freeze_epochs = 0;
    let fresh = accuracy(scratch, None, &train_set, &test_set);
    println!("3 classes, 450 training images, {} epochs: fine-tuned {tuned:.2}%, from scratch {fresh:.2}%", finetune.epochs);
    assert!(
        tuned >= fresh + 15.0,
        "fine-tuned {tuned:.2}% vs scratch {fresh:.2}%"
    );
}
