//! Export a checkpoint as an int8 model (a `.bin` file or the model
//! committed in `shared`), and compare int8 against float.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use rayon::prelude::*;
use serde::Serialize;

use crate::blob::{build_blob, meta_text, OwnedModel};
use crate::data::Dataset;
use crate::model::MiniResNet;
use crate::quantize::{calibrate, int8_input, Calibration};
use crate::train::{write_atomic, Checkpoint};

/// Float-vs-int8 comparison on a data set.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Images compared.
    pub images: usize,
    /// Float top-1 accuracy, %.
    pub float_accuracy: f64,
    /// Int8 top-1 accuracy, %.
    pub int8_accuracy: f64,
    /// `int8_accuracy - float_accuracy`, points.
    pub accuracy_delta: f64,
    /// Share of images where both predict the same class, %.
    pub top1_agreement: f64,
    /// Largest |dequantized int8 logit - float logit|.
    pub max_logit_error: f64,
    /// Mean |dequantized int8 logit - float logit|.
    pub mean_logit_error: f64,
    /// Float accuracy per class, %.
    pub float_per_class: Vec<f64>,
    /// Int8 accuracy per class, %.
    pub int8_per_class: Vec<f64>,
    /// Class names (the test set's).
    pub classes: Vec<String>,
}

/// Float logits `(N, classes)` of `model` on `ds`.
pub fn float_logits(model: &MiniResNet, ds: &Dataset, device: &Device) -> Result<Vec<Vec<f32>>> {
    let idx: Vec<usize> = (0..ds.len()).collect();
    let mut out = Vec::with_capacity(ds.len());
    for chunk in idx.chunks(256) {
        let (x, _) = crate::augment::batch(ds, chunk, None, device)?;
        let l = model.forward_t(&x, false)?;
        out.extend(l.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Int8 logits of every image of `ds`, through `shared::preprocess` and
/// `shared::model::Model::run` (both cores).
pub fn int8_logits(m: &OwnedModel, ds: &Dataset) -> Result<Vec<Vec<i8>>> {
    let model = m.model()?;
    check_classes(&model, ds)?;
    let classes = model.output().dims.len();
    (0..ds.len())
        .into_par_iter()
        .map_init(
            || {
                (
                    vec![0i8; model.arena_len()],
                    vec![0i16; model.scratch_len()],
                )
            },
            |(arena, scratch), i| {
                let input = int8_input(ds.image(i))?;
                let mut logits = vec![0i8; classes];
                model
                    .run(&input, arena, scratch, &mut logits)
                    .with_context(|| format!("running the int8 model on test image {i}"))?;
                Ok(logits)
            },
        )
        .collect()
}

/// The model's class names are the data set's, in the same order (else
/// its accuracy on the set would mean nothing).
pub fn check_classes(model: &shared::model::Model<'_>, ds: &Dataset) -> Result<()> {
    let names: Vec<&str> = model.class_names().collect();
    anyhow::ensure!(
        names.iter().eq(ds.classes.iter()),
        "the model classifies {} classes ({}), the data set has {} ({})",
        names.len(),
        names.join(", "),
        ds.classes.len(),
        ds.classes.join(", ")
    );
    Ok(())
}

/// Index of the first maximum (the board's [`shared::model::argmax`]).
pub use shared::model::argmax;

/// Compares float and int8 on `ds`.
pub fn compare(
    model: &MiniResNet,
    m: &OwnedModel,
    ds: &Dataset,
    device: &Device,
) -> Result<Comparison> {
    let fl = float_logits(model, ds, device)?;
    let ql = int8_logits(m, ds)?;
    let out = m.model()?.output();
    let classes = out.dims.len();
    let (mut fc, mut qc, mut agree) = (0usize, 0usize, 0usize);
    let (mut max_err, mut sum_err) = (0f64, 0f64);
    let mut per = vec![[0usize; 3]; classes]; // count, float right, int8 right
    for i in 0..ds.len() {
        let label = ds.labels[i] as usize;
        let (pf, pq) = (argmax(&fl[i]), argmax(&ql[i]));
        fc += (pf == label) as usize;
        qc += (pq == label) as usize;
        agree += (pf == pq) as usize;
        per[label][0] += 1;
        per[label][1] += (pf == label) as usize;
        per[label][2] += (pq == label) as usize;
        for c in 0..classes {
            let dq = (ql[i][c] as i32 - out.zero_point) as f64 * out.scale as f64;
            let e = (dq - fl[i][c] as f64).abs();
            max_err = max_err.max(e);
            sum_err += e;
        }
    }
    let n = ds.len().max(1) as f64;
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    Ok(Comparison {
        images: ds.len(),
        float_accuracy: pct(fc, ds.len()),
        int8_accuracy: pct(qc, ds.len()),
        accuracy_delta: pct(qc, ds.len()) - pct(fc, ds.len()),
        top1_agreement: pct(agree, ds.len()),
        max_logit_error: max_err,
        mean_logit_error: sum_err / (n * classes as f64),
        float_per_class: per.iter().map(|p| pct(p[1], p[0])).collect(),
        int8_per_class: per.iter().map(|p| pct(p[2], p[0])).collect(),
        classes: ds.classes.clone(),
    })
}

impl Comparison {
    /// A table for the terminal.
    pub fn report(&self) -> String {
        let mut s = format!("{:<12} {:>8} {:>8}\n", "class", "float %", "int8 %");
        for (c, (f, q)) in self
            .float_per_class
            .iter()
            .zip(&self.int8_per_class)
            .enumerate()
        {
            s.push_str(&format!(
                "{:<12} {f:>8.2} {q:>8.2}\n",
                self.classes.get(c).map_or("?", String::as_str)
            ));
        }
        s.push_str(&format!(
            "float accuracy {:.2}%, int8 accuracy {:.2}% ({:+.2} points), top-1 agreement {:.2}%, \
             logit error max {:.4} mean {:.4}, on {} images",
            self.float_accuracy,
            self.int8_accuracy,
            self.accuracy_delta,
            self.top1_agreement,
            self.max_logit_error,
            self.mean_logit_error,
            self.images
        ));
        s
    }
}

/// Int8 accuracy of a model alone (no float checkpoint), per class with
/// the class names from the model.
#[derive(Debug, Clone, Serialize)]
pub struct Int8Eval {
    /// Images evaluated.
    pub images: usize,
    /// Top-1 accuracy, %.
    pub int8_accuracy: f64,
    /// Accuracy per class, %.
    pub int8_per_class: Vec<f64>,
    /// Test images per class.
    pub images_per_class: Vec<usize>,
    /// Class names, from the model.
    pub classes: Vec<String>,
}

/// Measures `m` on `ds` (whose classes must be the model's).
pub fn evaluate_int8(m: &OwnedModel, ds: &Dataset) -> Result<Int8Eval> {
    let logits = int8_logits(m, ds)?;
    let classes: Vec<String> = m.model()?.class_names().map(str::to_string).collect();
    let mut per = vec![[0usize; 2]; classes.len()]; // count, right
    for (l, &y) in logits.iter().zip(&ds.labels) {
        per[y as usize][0] += 1;
        per[y as usize][1] += (argmax(l) == y as usize) as usize;
    }
    let right: usize = per.iter().map(|p| p[1]).sum();
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    Ok(Int8Eval {
        images: ds.len(),
        int8_accuracy: pct(right, ds.len()),
        int8_per_class: per.iter().map(|p| pct(p[1], p[0])).collect(),
        images_per_class: per.iter().map(|p| p[0]).collect(),
        classes,
    })
}

impl Int8Eval {
    /// A per-class table for the terminal.
    pub fn report(&self) -> String {
        let w = self
            .classes
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!("{:<w$} {:>7} {:>8}\n", "class", "images", "int8 %");
        for ((name, n), a) in self
            .classes
            .iter()
            .zip(&self.images_per_class)
            .zip(&self.int8_per_class)
        {
            s.push_str(&format!("{name:<w$} {n:>7} {a:>8.2}\n"));
        }
        s
    }
}

/// Export options.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Training images used for calibration (spread evenly over the set).
    pub calib_images: usize,
    /// Range estimator.
    pub calibration: Calibration,
    /// Correct each conv and FC bias for its weights' quantization error
    /// ([`crate::quantize::correct_biases`]).
    pub bias_correction: bool,
    /// Data set name, for the provenance.
    pub dataset: String,
}

/// The trainer's git revision (`git describe --always --dirty`), or
/// `unknown` outside a git checkout.
pub fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Quantizes `model` (from checkpoint `ck`) and measures it on `test`.
/// Returns the blob, with the measured figures in its provenance, and the
/// comparison. Deterministic: the same checkpoint, data and options give
/// the same bytes.
pub fn export(
    model: &MiniResNet,
    ck: &Checkpoint,
    train_set: &Dataset,
    test_set: &Dataset,
    opts: &ExportOptions,
    device: &Device,
) -> Result<(Vec<u8>, Comparison)> {
    let calib = train_set.subsample(opts.calib_images);
    let (mut graph, q, means) = calibrate(model, &calib, opts.calibration, 64)?;
    if opts.bias_correction {
        crate::quantize::correct_biases(&mut graph, &means);
    }
    let cfg = &ck.meta.config;
    let mut base: Vec<(&str, String)> = vec![
        ("model", "mini-resnet".into()),
        ("arch", serde_json::to_string(&cfg.arch)?),
        ("recipe", cfg.recipe.name()),
        ("epochs", ck.meta.epoch.to_string()),
    ];
    // Where the weights came from (e.g. an average of checkpoints).
    base.push(("weights", ck.origin()));
    base.extend([
        ("dataset", opts.dataset.clone()),
        (
            "calibration",
            format!(
                "{} on {} training images{}",
                opts.calibration,
                calib.len(),
                if opts.bias_correction {
                    ", bias correction"
                } else {
                    ""
                }
            ),
        ),
        ("trainer_revision", git_revision()),
        (
            "input",
            "pixel-128, scale 1/128, zero point 0 (shared::preprocess)".into(),
        ),
    ]);
    // First pass without the figures, to measure the int8 network itself.
    let classes = &test_set.classes;
    anyhow::ensure!(
        classes.len() == cfg.arch.classes,
        "the checkpoint's model has {} classes, the test set {} ({}): pass the data set it was trained on (--data)",
        cfg.arch.classes,
        classes.len(),
        classes.join(", ")
    );
    let draft = OwnedModel::new(&build_blob(&graph, &q, &meta_text(&base), classes)?)?;
    let cmp = compare(model, &draft, test_set, device)?;
    let mut meta = base;
    meta.push(("test_images", cmp.images.to_string()));
    meta.push(("float_accuracy", format!("{:.2}", cmp.float_accuracy)));
    meta.push(("int8_accuracy", format!("{:.2}", cmp.int8_accuracy)));
    meta.push(("top1_agreement", format!("{:.2}", cmp.top1_agreement)));
    let blob = build_blob(&graph, &q, &meta_text(&meta), classes)?;
    Ok((blob, cmp))
}

/// Test images the float reference covers (spread evenly over the test set).
pub const REFERENCE_IMAGES: usize = 200;

/// FNV-1a 64 of an image's bytes: identifies reference images.
pub fn image_hash(img: &[u8]) -> u64 {
    img.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Writes the float model's logits for [`REFERENCE_IMAGES`] test images as
/// text lines `hash label l0 … l9`, so tests without the float checkpoint
/// (the QEMU test) can measure int8-vs-float class agreement.
pub fn write_float_reference(
    model: &MiniResNet,
    test_set: &Dataset,
    path: &Path,
    device: &Device,
) -> Result<()> {
    let sub = test_set.subsample(REFERENCE_IMAGES);
    let logits = float_logits(model, &sub, device)?;
    let mut s =
        String::from("# float logits of the exported checkpoint: fnv1a64(image) label logits...\n");
    for (i, l) in logits.iter().enumerate() {
        s.push_str(&format!(
            "{:016x} {}",
            image_hash(sub.image(i)),
            sub.labels[i]
        ));
        for v in l {
            s.push_str(&format!(" {v:.6}"));
        }
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}

/// Reads a file written by [`write_float_reference`]: hash → (label, logits).
pub fn read_float_reference(path: &Path) -> Result<std::collections::HashMap<u64, (u8, Vec<f32>)>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut map = std::collections::HashMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#'))
    {
        let bad = || anyhow::anyhow!("{}:{}: malformed line", path.display(), n + 1);
        let mut it = line.split_whitespace();
        let hash = u64::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
        let label: u8 = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let logits: Vec<f32> = it
            .map(|v| v.parse::<f32>().map_err(|_| bad()))
            .collect::<Result<_>>()?;
        map.insert(hash, (label, logits));
    }
    Ok(map)
}

/// Where `--out shared` writes: `shared/src/model/generated/`.
pub fn shared_generated_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/src/model/generated")
}

/// Writes `blob` as the model committed in `shared`: `model.bin` plus the
/// generated `mod.rs` with its sizes and provenance.
pub fn write_shared(blob: &[u8], dir: &Path) -> Result<()> {
    let owned = OwnedModel::new(blob)?;
    let m = owned.model()?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("model.bin"), blob)?;
    let mut doc = String::new();
    for line in m.meta().lines() {
        doc.push_str(&format!("//! - {line}\n"));
    }
    let src = format!(
        "//! The int8 model shipped with `shared`. Generated by `host-trainer export` from a\n\
         //! checkpoint: do not edit; re-export instead.\n//!\n{doc}\n\
         use super::Aligned;\n\n\
         /// Blob format version this file was generated for.\n\
         pub const GENERATED_FORMAT_VERSION: u16 = {ver};\n\
         const _: () = assert!(\n    GENERATED_FORMAT_VERSION == super::FORMAT_VERSION,\n    \
         \"the committed model was exported for another blob format: re-export it with `host-trainer export`\"\n);\n\n\
         /// Activation arena bytes the model needs.\n\
         pub const ARENA_LEN: usize = {arena};\n\
         /// Conv scratch (`i16` elements) the model needs.\n\
         pub const SCRATCH_LEN: usize = {scratch};\n\
         /// Conv scratch (`i16` elements, 4-byte aligned) for the fast kernels' fastest paths.\n\
         pub const SCRATCH_LEN_FAST: usize = {fast};\n\n\
         static BLOB_BYTES: Aligned<[u8; {len}]> = Aligned(*include_bytes!(\"model.bin\"));\n\n\
         /// The model blob ({len} bytes), 16-byte aligned.\n\
         pub static BLOB: &Aligned<[u8]> = &BLOB_BYTES;\n",
        ver = shared::model::FORMAT_VERSION,
        arena = m.arena_len(),
        scratch = m.scratch_len(),
        fast = m.fast_scratch_len(),
        len = blob.len(),
    );
    write_atomic(&dir.join("mod.rs"), src.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed `shared/src/model/generated/` is exactly what
    /// [`write_shared`] writes for the committed blob: nobody edited it by
    /// hand, and the sizes in it (arena, scratch) are the model's.
    #[test]
    fn committed_generated_source_is_write_shared_output() {
        let dir = tempfile::tempdir().unwrap();
        let blob = &shared::model::BLOB.0;
        write_shared(blob, dir.path()).unwrap();
        let committed = shared_generated_dir();
        for name in ["mod.rs", "model.bin"] {
            let want = fs::read(dir.path().join(name)).unwrap();
            let got = fs::read(committed.join(name)).unwrap();
            assert!(
                want == got,
                "{} differs from what `write_shared` generates for the committed blob:\n{}",
                committed.join(name).display(),
                String::from_utf8_lossy(&want)
            );
        }
    }
}
