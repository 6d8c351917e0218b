//! Shipping: replacing the model committed in `shared`.
//!
//! The committed model is what every firmware build and test uses, so it is
//! only replaced on request (`train --export shared`, `export --out
//! shared`) and never by a model that measures worse: the candidate's int8
//! accuracy is compared with the shipped model's on the same test images,
//! and a lower figure is refused unless forced. Shipping writes the blob,
//! its generated `mod.rs`, the float reference logits and the float
//! checkpoint (weights and batch-norm statistics only) side by side.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;

use crate::blob::OwnedModel;
use crate::checkpoint::{
    load_checkpoint, model_from_checkpoint, save_weights, write_atomic, Checkpoint,
};
use crate::data::Dataset;
use crate::export::{
    export, shared_generated_dir, write_float_reference, write_shared, ExportOptions,
};
use crate::model::MiniResNet;

/// File name of the committed float checkpoint, next to `model.bin`.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The committed float checkpoint (`--checkpoint default`).
pub fn shipped_checkpoint() -> PathBuf {
    shared_generated_dir().join(CHECKPOINT_FILE)
}

/// `default` → [`shipped_checkpoint`]; any other path as it is.
pub fn resolve_checkpoint(p: &Path) -> PathBuf {
    if p == Path::new("default") {
        shipped_checkpoint()
    } else {
        p.to_path_buf()
    }
}

/// One export: a checkpoint quantized once, written to each destination.
#[derive(Debug)]
pub struct ExportJob<'a> {
    /// The float checkpoint (`default` allowed).
    pub checkpoint: &'a Path,
    /// Destinations: `shared` (under the rule of [`check_replace`]),
    /// `.bin` file paths, or `.tflite` file paths (the same blob as TFLite,
    /// with its class names).
    pub outs: &'a [&'a str],
    /// Calibration and provenance.
    pub options: ExportOptions,
    /// Replace a more accurate shipped model.
    pub force: bool,
    /// Calibration images come from here.
    pub train_set: &'a Dataset,
    /// The float-vs-int8 comparison runs here.
    pub test_set: &'a Dataset,
}

/// Runs `job`: prints the float-vs-int8 comparison and writes the blob.
pub fn export_checkpoint(job: &ExportJob<'_>, device: &Device) -> Result<()> {
    let path = resolve_checkpoint(job.checkpoint);
    let ck = load_checkpoint(&path, device)?;
    let t = model_from_checkpoint(&ck, device)?;
    let (blob, cmp) = export(
        &t.model,
        &ck,
        job.train_set,
        job.test_set,
        &job.options,
        device,
    )?;
    println!("{}", cmp.report());
    for &out in job.outs {
        if out == "shared" {
            let dir = shared_generated_dir();
            let shipment = Shipment {
                blob: &blob,
                int8_accuracy: cmp.int8_accuracy,
                checkpoint: &ck,
                // A weights-only checkpoint (such as the shipped one)
                // keeps the line that says where its weights came from; a
                // run's says what the run was.
                provenance: Some(ck.provenance.clone().unwrap_or_else(|| {
                    format!("{}; exported by {}", ck.origin(), trainer_revision())
                })),
                model: &t.model,
                test_set: job.test_set,
                force: job.force,
            };
            ship(&shipment, &dir, device)?;
            println!(
                "int8 model ({} bytes) and its float checkpoint written to {}",
                blob.len(),
                dir.display()
            );
        } else if out.ends_with(".tflite") {
            let owned = OwnedModel::new(&blob)?;
            crate::tflite::write_tflite(&owned, Path::new(out))?;
        } else {
            write_atomic(Path::new(out), &blob)?;
            println!("int8 model ({} bytes) written to {out}", blob.len());
        }
    }
    Ok(())
}

/// Int8 top-1 accuracy (%) of `m` on `ds`.
pub fn int8_accuracy(m: &OwnedModel, ds: &Dataset) -> Result<f64> {
    Ok(crate::export::evaluate_int8(m, ds)?.int8_accuracy)
}

/// Decides whether a candidate of int8 accuracy `candidate` (on `test_set`)
/// may replace the model in `dir`: yes when there is none, when the file
/// there is not a valid model (with a warning), or when the candidate is
/// at least as accurate; otherwise only with `force` (with a warning).
pub fn check_replace(dir: &Path, candidate: f64, test_set: &Dataset, force: bool) -> Result<()> {
    let path = dir.join("model.bin");
    if !path.exists() {
        return Ok(());
    }
    let shipped = match OwnedModel::load(&path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "warning: the shipped model {} is not valid ({e:#}); replacing it",
                path.display()
            );
            return Ok(());
        }
    };
    let same_classes = shipped
        .model()
        .map(|m| crate::export::check_classes(&m, test_set).is_ok())
        .unwrap_or(false);
    if !same_classes {
        let names: Vec<String> = shipped
            .model()
            .map(|m| m.class_names().map(str::to_string).collect())
            .unwrap_or_default();
        ensure!(
            force,
            "not replacing the shipped model {}: it classifies other classes ({}) than the new one ({}). \
             Pass --force to replace it anyway",
            path.display(),
            names.join(", "),
            test_set.classes.join(", ")
        );
        eprintln!(
            "warning: --force: replacing the shipped model ({}) with one for other classes ({})",
            names.join(", "),
            test_set.classes.join(", ")
        );
        return Ok(());
    }
    let now = int8_accuracy(&shipped, test_set)
        .with_context(|| format!("measuring the shipped model {}", path.display()))?;
    let n = test_set.len();
    if candidate >= now {
        eprintln!(
            "shipping: int8 {candidate:.2}% on {n} test images, the shipped model had {now:.2}%"
        );
        return Ok(());
    }
    if force {
        eprintln!(
            "warning: --force: replacing the shipped model (int8 {now:.2}% on {n} test images) \
             with a less accurate one ({candidate:.2}%)"
        );
        return Ok(());
    }
    bail!(
        "not replacing the shipped model {}: its int8 accuracy is {now:.2}% on these {n} test images, \
         the new model's {candidate:.2}%. Pass --force to replace it anyway",
        path.display()
    )
}

/// What is shipped together.
#[derive(Debug)]
pub struct Shipment<'a> {
    /// The int8 blob.
    pub blob: &'a [u8],
    /// Its int8 accuracy on `test_set`.
    pub int8_accuracy: f64,
    /// The float checkpoint it was exported from.
    pub checkpoint: &'a Checkpoint,
    /// That checkpoint's provenance line, if it has one (weights-only
    /// checkpoints); otherwise this workspace's revision is written.
    pub provenance: Option<String>,
    /// The float model (for the reference logits).
    pub model: &'a MiniResNet,
    /// The test set both were measured on.
    pub test_set: &'a Dataset,
    /// Replace even a more accurate shipped model.
    pub force: bool,
}

/// Ships into `dir` (normally [`shared_generated_dir`]) under the rule of
/// [`check_replace`].
pub fn ship(s: &Shipment<'_>, dir: &Path, device: &Device) -> Result<()> {
    check_replace(dir, s.int8_accuracy, s.test_set, s.force)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let line = s.provenance.clone().unwrap_or_else(trainer_revision);
    save_weights(&dir.join(CHECKPOINT_FILE), s.checkpoint, &line)?;
    write_float_reference(
        s.model,
        s.test_set,
        &dir.join("float_reference.txt"),
        device,
    )?;
    write_shared(s.blob, dir)
}

/// `host-trainer <version> at git <revision>`: the trainer that wrote a
/// checkpoint, for its provenance.
pub fn trainer_revision() -> String {
    format!(
        "host-trainer {} at git {}",
        env!("CARGO_PKG_VERSION"),
        crate::export::git_revision()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;

    #[test]
    fn a_less_accurate_model_is_refused_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = synthetic(20, 10, 1);
        ds.classes = shared::CIFAR10_CLASSES.map(String::from).to_vec();
        // No shipped model: anything goes.
        check_replace(dir.path(), 0.0, &ds, false).unwrap();
        // A damaged file is replaced, with a warning.
        fs::write(dir.path().join("model.bin"), b"not a model").unwrap();
        check_replace(dir.path(), 0.0, &ds, false).unwrap();
        // A real model: its accuracy on `ds` is the bar.
        let blob = shared::model::BLOB.0.to_vec();
        fs::write(dir.path().join("model.bin"), &blob).unwrap();
        let now = int8_accuracy(&OwnedModel::new(&blob).unwrap(), &ds).unwrap();
        check_replace(dir.path(), now, &ds, false).unwrap();
        let e = check_replace(dir.path(), now - 0.5, &ds, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{now:.2}%")) && e.contains("--force"),
            "{e}"
        );
        assert!(e.contains(&format!("{:.2}%", now - 0.5)), "{e}");
        check_replace(dir.path(), now - 0.5, &ds, true).unwrap();
        // A model of other classes: refused unless forced, whatever the
        // figures, naming both class lists.
        let mut other = synthetic(20, 3, 2);
        other.classes = vec!["ok".into(), "damaged".into(), "empty".into()];
        let e = check_replace(dir.path(), 100.0, &other, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("airplane, automobile")
                && e.contains("ok, damaged, empty")
                && e.contains("--force"),
            "{e}"
        );
        check_replace(dir.path(), 100.0, &other, true).unwrap();
    }
}
