//! The firmware's QEMU image (Cortex-M7, `mps2-an500`) against the host:
//! 200 CIFAR-10 test images, shown as 160x120 RGB565 camera frames, must
//! give bit-identical int8 logits on both (the host runs the fast kernels
//! through the DSP emulation layer, QEMU on the real SMLAD/SXTB16
//! instructions); the class agreement with the float model (recorded at
//! export) is measured; and the instructions per inference may not grow by
//! more than 2% over `tests/snapshots/mcu-instructions.json`.
//!
//! Needs `qemu-system-arm` (`cargo xtask ci` installs it). The images are
//! the subset shipped in `tests/data/cifar10-test-200/` (the 200 test
//! images of the float reference; `tests/tests/test_subset.rs` checks it
//! against the full data set when that is present), so the test needs no
//! data set beside the workspace.

use host_trainer::data::{self, Dataset, Split};
use host_trainer::export::{image_hash, read_float_reference, REFERENCE_IMAGES};
use shared::model::{argmax, Model};
use shared::preprocess::{preprocess, Frame, PixelFormat, INPUT_LEN};
use tests::data::subset_dir;
use tests::qemu::{
    build_qemu_image, camera_frame, run_qemu, workspace_root, write_frames, FrameFormat,
};
use tests::snapshot::Snapshot;
use workspace_util::median;

#[test]
fn qemu_firmware_is_bit_exact_with_host() {
    let model = shared::model::default_model().expect("the model committed in shared is invalid");
    let dir = subset_dir();
    let src = data::detect(&dir).expect("the shipped test subset");
    let images = data::load(&src, Split::Test).expect("reading the shipped test subset");
    assert_eq!(images.len(), REFERENCE_IMAGES);
    let (w, h) = (160, 120);
    let frames: Vec<Vec<u8>> = (0..images.len())
        .map(|i| camera_frame(images.image(i), w, h, FrameFormat::Rgb565Be))
        .collect();

    let host = host_logits(&model, &frames, w, h);
    let elf = build_qemu_image().expect("building the QEMU image");
    let tmp = tempfile::tempdir().unwrap();
    write_frames(
        &tmp.path().join("frames.bin"),
        &frames,
        w,
        h,
        FrameFormat::Rgb565Be,
    )
    .unwrap();
    let run = run_qemu(&elf, tmp.path(), 900).expect("running the firmware in QEMU");
    assert_eq!(
        run.logits.len(),
        frames.len(),
        "QEMU classified {} of {} frames",
        run.logits.len(),
        frames.len()
    );
    for (i, (q, hst)) in run.logits.iter().zip(&host).enumerate() {
        assert_eq!(q, hst, "frame {i}: QEMU and host logits differ");
    }
    assert_eq!(
        run.classes,
        shared::CIFAR10_CLASSES,
        "class names from the blob"
    );
    check_top1_names(&run, &model);
    check_snapshot(&run.network_insn, frames.len());
    check_float_agreement(&images, &run.logits);
}

/// The classes of the 3-class model: CIFAR-10 label, folder name.
const OWN_CLASSES: [(u8, &str); 3] = [(0, "airplane"), (3, "cat"), (8, "ship")];

/// Writes the subset's images of [`OWN_CLASSES`] as 40x40 JPEG class
/// folders (`dir/<class>/<n>.jpg`): a user's own data set, in miniature.
fn write_own_classes(images: &Dataset, dir: &std::path::Path) {
    for (label, name) in OWN_CLASSES {
        let class_dir = dir.join(name);
        std::fs::create_dir_all(&class_dir).unwrap();
        for i in (0..images.len()).filter(|&i| images.labels[i] == label) {
            let img = image::RgbImage::from_raw(32, 32, images.image(i).to_vec()).unwrap();
            let big = image::imageops::resize(&img, 40, 40, image::imageops::FilterType::Triangle);
            big.save(class_dir.join(format!("{i:03}.jpg"))).unwrap();
        }
    }
}

/// Train → export → QEMU for a model of the user's own classes: three
/// classes of JPEG folders, one epoch fine-tuned from the shipped
/// checkpoint, exported with its class names, then run by the unchanged
/// QEMU image (the blob passed as `model.bin`): bit-identical logits to
/// the host, and the names logged from the blob.
#[test]
fn three_class_model_end_to_end_in_qemu() {
    let src = data::detect(&subset_dir()).expect("the shipped test subset");
    let images = data::load(&src, Split::Test).expect("reading the shipped test subset");
    let tmp = tempfile::tempdir().unwrap();
    let folders = tmp.path().join("own");
    write_own_classes(&images, &folders);
    let source = data::detect(&folders).unwrap();
    let train_set = data::load(&source, Split::Train).unwrap();
    let test_set = data::load(&source, Split::Test).unwrap();
    let names: Vec<&str> = OWN_CLASSES.iter().map(|c| c.1).collect();
    assert_eq!(train_set.classes, names);
    assert!(test_set.len() >= 6, "{} test images", test_set.len());

    let blob = fine_tune_and_export(&train_set, &test_set, &tmp.path().join("run"));
    let model = Model::parse(&blob).expect("the exported 3-class blob");
    assert_eq!(model.class_names().collect::<Vec<_>>(), names);

    let (w, h) = (160, 120);
    let frames: Vec<Vec<u8>> = (0..test_set.len())
        .map(|i| camera_frame(test_set.image(i), w, h, FrameFormat::Rgb565Be))
        .collect();
    let host = host_logits(&model, &frames, w, h);
    let elf = build_qemu_image().expect("building the QEMU image");
    let qdir = tmp.path().join("qemu");
    std::fs::create_dir_all(&qdir).unwrap();
    std::fs::write(qdir.join("model.bin"), &blob).unwrap();
    write_frames(
        &qdir.join("frames.bin"),
        &frames,
        w,
        h,
        FrameFormat::Rgb565Be,
    )
    .unwrap();
    let run = run_qemu(&elf, &qdir, 300).expect("running the firmware in QEMU");
    let line = &run.model_line;
    assert!(
        line.contains("source=model.bin") && line.ends_with("classes=3"),
        "{line}"
    );
    assert_eq!(run.classes, names, "class names logged by the QEMU image");
    assert_eq!(run.logits.len(), frames.len());
    for (i, (q, hst)) in run.logits.iter().zip(&host).enumerate() {
        assert_eq!(q.len(), 3);
        assert_eq!(q, hst, "frame {i}: QEMU and host logits differ");
    }
    check_top1_names(&run, &model);
}

/// One epoch of the `finetune` recipe from the shipped checkpoint in
/// `run_dir`, then the int8 export; returns the blob.
fn fine_tune_and_export(
    train_set: &Dataset,
    test_set: &Dataset,
    run_dir: &std::path::Path,
) -> Vec<u8> {
    use host_trainer::train::{self, Recipe, RunOptions, TrainConfig};
    let device = candle_core::Device::Cpu;
    let mut cfg =
        TrainConfig::from_recipe(Recipe::Finetune, train_set.len(), Some(1), None, None).unwrap();
    cfg.arch.classes = train_set.classes.len();
    cfg.init = Some(host_trainer::ship::shipped_checkpoint());
    cfg.freeze_epochs = 0;
    let opts = RunOptions {
        run_dir: run_dir.to_path_buf(),
        resume: false,
        eval_batch: 64,
        stop_after: None,
        progress: false,
    };
    train::train(cfg, train_set, test_set, &opts, &device).expect("fine-tuning");
    let ck = train::load_checkpoint(&run_dir.join("checkpoint.safetensors"), &device).unwrap();
    let model = train::model_from_checkpoint(&ck, &device).unwrap();
    let opts = host_trainer::export::ExportOptions {
        calib_images: train_set.len(),
        calibration: "percentile:99.999".parse().unwrap(),
        bias_correction: true,
        dataset: "3 CIFAR-10 classes as JPEG folders".into(),
    };
    let (blob, cmp) =
        host_trainer::export::export(&model.model, &ck, train_set, test_set, &opts, &device)
            .unwrap();
    assert_eq!(cmp.classes.len(), 3);
    blob
}

/// Each frame's `TOP1` line names the class of the first maximum logit,
/// with the name the blob gives it.
fn check_top1_names(run: &tests::qemu::QemuRun, model: &Model<'_>) {
    assert_eq!(run.top1.len(), run.logits.len());
    for (i, ((class, _, name), l)) in run.top1.iter().zip(&run.logits).enumerate() {
        assert_eq!(*class, argmax(l), "frame {i}");
        assert_eq!(Some(name.as_str()), model.class_name(*class), "frame {i}");
    }
}

/// The int8 logits of each frame on the host, through the path the
/// firmware takes (preprocess, then the network).
fn host_logits(model: &Model<'_>, frames: &[Vec<u8>], w: usize, h: usize) -> Vec<Vec<i8>> {
    let mut arena = vec![0i8; model.arena_len()];
    let mut scratch = vec![0i16; model.scratch_len()];
    frames
        .iter()
        .map(|f| {
            let mut input = [0i8; INPUT_LEN];
            preprocess(
                &Frame {
                    data: f,
                    width: w,
                    height: h,
                    format: PixelFormat::Rgb565Be,
                },
                &mut input,
            )
            .unwrap();
            let mut logits = vec![0i8; model.output().dims.len()];
            model
                .run(&input, &mut arena, &mut scratch, &mut logits)
                .unwrap();
            logits
        })
        .collect()
}

/// The instruction-count snapshot: more than 2% growth of the median
/// network instructions is a failure.
fn check_snapshot(network_insn: &[u64], frames: usize) {
    let v: Vec<f64> = network_insn.iter().map(|&x| x as f64).collect();
    let insn = median(&v).round() as u64;
    eprintln!("{frames} frames bit-exact; median network instructions {insn}");
    let snap = Snapshot::read().expect("the instruction-count snapshot");
    match snap.check(insn) {
        Ok(None) => eprintln!("within 2% of the snapshot ({})", snap.total),
        Ok(Some(hint)) => eprintln!("note: {hint}"),
        Err(e) => panic!("{e}"),
    }
}

/// Class agreement of the QEMU `logits` with the float model on the
/// original 32x32 images (from the float reference written at export).
fn check_float_agreement(images: &Dataset, logits: &[Vec<i8>]) {
    let reference = read_float_reference(
        &workspace_root().join("shared/src/model/generated/float_reference.txt"),
    )
    .expect("float reference written by `host-trainer export`");
    let mut agree = 0;
    let mut correct_int8 = 0;
    for (i, q) in logits.iter().enumerate() {
        let (label, fl) = reference
            .get(&image_hash(images.image(i)))
            .unwrap_or_else(|| {
                panic!("test image {i} is not in the float reference: re-export the model")
            });
        assert_eq!(*label, images.labels[i]);
        agree += (argmax(q) == argmax(fl)) as usize;
        correct_int8 += (argmax(q) == *label as usize) as usize;
    }
    let n = logits.len() as f64;
    let pct = 100.0 * agree as f64 / n;
    eprintln!(
        "camera path int8 (QEMU) vs float: {pct:.1}% class agreement; int8 accuracy on these frames {:.1}%",
        100.0 * correct_int8 as f64 / n
    );
    assert!(
        pct >= 90.0,
        "class agreement with the float model is only {pct:.1}%"
    );
}
