//! `tflite-check`: the same int8 inputs through TFLite Micro's interpreter
//! (Python `tflite_micro`, run by `tflite/run_tflm.py` in `tflite/.venv`)
//! and through `shared::model::run`, compared byte for byte; on a
//! difference, the first layer and element where the two diverge.
//!
//! Not part of CI: it needs PyPI (once, for the venv) and the test set.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::blob::OwnedModel;
use crate::data::Dataset;
use crate::export::{argmax, int8_logits};
use crate::quantize::int8_input;

/// The Python side: the venv's interpreter and the runner script.
#[derive(Debug, Clone)]
pub struct Tflm {
    /// `tflite/.venv/bin/python`.
    pub python: PathBuf,
    /// `tflite/run_tflm.py`.
    pub script: PathBuf,
}

impl Tflm {
    /// The venv under `<workspace>/tflite`, created with `tflite/setup.sh`
    /// when it is missing or cannot import `tflite_micro`.
    pub fn setup(workspace: &Path) -> Result<Self> {
        let dir = workspace.join("tflite");
        let tflm = Self {
            python: dir.join(".venv/bin/python"),
            script: dir.join("run_tflm.py"),
        };
        let ready = || {
            Command::new(&tflm.python)
                .args(["-c", "from tflite_micro import runtime"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !ready() {
            eprintln!(
                "tflite-check: creating {} (tflite/setup.sh)",
                dir.join(".venv").display()
            );
            let setup = dir.join("setup.sh");
            let status = Command::new("bash")
                .arg(&setup)
                .status()
                .with_context(|| format!("running {}", setup.display()))?;
            ensure!(status.success(), "{} failed with {status}", setup.display());
            ensure!(
                ready(),
                "{} cannot import tflite_micro after setup",
                tflm.python.display()
            );
        }
        Ok(tflm)
    }

    /// Runs `run_tflm.py model inputs outputs extra…` and reads `outputs`.
    fn run(&self, model: &Path, inputs: &Path, outputs: &Path, extra: &[&str]) -> Result<Vec<u8>> {
        let status = Command::new(&self.python)
            .arg(&self.script)
            .args([model, inputs, outputs])
            .args(extra)
            .status()
            .with_context(|| format!("starting {}", self.python.display()))?;
        ensure!(
            status.success(),
            "{} {} failed with {status}",
            self.script.display(),
            model.display()
        );
        std::fs::read(outputs).with_context(|| format!("reading {}", outputs.display()))
    }
}

/// The outcome of [`check`].
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Test images compared.
    pub images: usize,
    /// Indices of the images whose int8 logits differ in any byte.
    pub differing: Vec<usize>,
    /// Top-1 accuracy (%) of `shared::model::run`.
    pub host_accuracy: f64,
    /// Top-1 accuracy (%) of TFLM.
    pub tflm_accuracy: f64,
    /// Seconds TFLM took (interpreter start included).
    pub tflm_seconds: f64,
    /// Seconds the host kernels took.
    pub host_seconds: f64,
}

impl CheckReport {
    /// The summary lines `tflite-check` prints.
    pub fn summary(&self) -> String {
        format!(
            "images whose int8 logits differ in any byte: {} of {}\n\
             top-1 accuracy: shared::model::run {:.2}%, TFLM {:.2}%\n\
             time: TFLM {:.1} s, shared::model::run {:.1} s",
            self.differing.len(),
            self.images,
            self.host_accuracy,
            self.tflm_accuracy,
            self.tflm_seconds,
            self.host_seconds
        )
    }
}

/// The int8 network inputs of every image of `ds` (`quantize::int8_input`,
/// the firmware's preprocessing), back to back.
fn all_inputs(ds: &Dataset) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(ds.len() * shared::preprocess::INPUT_LEN);
    for i in 0..ds.len() {
        v.extend(int8_input(ds.image(i))?.iter().map(|&x| x as u8));
    }
    Ok(v)
}

fn accuracy(logits: &[Vec<i8>], labels: &[u8]) -> f64 {
    let hits = logits
        .iter()
        .zip(labels)
        .filter(|(l, &y)| argmax(l) == usize::from(y))
        .count();
    100.0 * hits as f64 / labels.len().max(1) as f64
}

/// Every image of `ds` through TFLM (the `.tflite` file at `tflite`) and
/// through `shared::model::run` (`blob`); `work` holds the exchanged files.
pub fn check(
    blob: &OwnedModel,
    tflite: &Path,
    ds: &Dataset,
    tflm: &Tflm,
    work: &Path,
) -> Result<CheckReport> {
    let classes = blob.model()?.output().dims.len();
    let inputs = work.join("inputs.bin");
    std::fs::write(&inputs, all_inputs(ds)?)
        .with_context(|| format!("writing {}", inputs.display()))?;
    let t0 = Instant::now();
    let out = tflm.run(tflite, &inputs, &work.join("outputs.bin"), &[])?;
    let tflm_seconds = t0.elapsed().as_secs_f64();
    ensure!(
        out.len() == ds.len() * classes,
        "TFLM wrote {} bytes for {} images of {classes} logits",
        out.len(),
        ds.len()
    );
    let theirs: Vec<Vec<i8>> = out
        .chunks(classes)
        .map(|c| c.iter().map(|&b| b as i8).collect())
        .collect();
    let t0 = Instant::now();
    let ours = int8_logits(blob, ds)?;
    let host_seconds = t0.elapsed().as_secs_f64();
    let differing = (0..ds.len()).filter(|&i| ours[i] != theirs[i]).collect();
    Ok(CheckReport {
        images: ds.len(),
        differing,
        host_accuracy: accuracy(&ours, &ds.labels),
        tflm_accuracy: accuracy(&theirs, &ds.labels),
        tflm_seconds,
        host_seconds,
    })
}

/// Where TFLM and `shared::model::run` first part on one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    /// Layer index in the blob.
    pub layer: u16,
    /// Layer name.
    pub name: String,
    /// The layer's output tensor (the same index in the `.tflite` file).
    pub tensor: u16,
    /// First differing element (NHWC order).
    pub element: usize,
    /// Our value there.
    pub host: i8,
    /// TFLM's value there.
    pub tflm: i8,
    /// Differing elements of that tensor.
    pub count: usize,
}

/// Every layer's output on `input`, in layer order, from the host kernels.
fn host_layer_outputs(blob: &OwnedModel, input: &[i8]) -> Result<Vec<Vec<i8>>> {
    let model = blob.model()?;
    let mut arena = vec![0i8; model.arena_len()];
    let mut scratch = vec![0i16; model.scratch_len()];
    model.load_input(input, &mut arena)?;
    let mut outs = Vec::new();
    for (i, layer) in model.layers().enumerate() {
        model.run_layer(i as u16, &mut arena, &mut scratch)?;
        let t = model.tensor(layer.output).context("layer output tensor")?;
        outs.push(arena[t.range()].to_vec());
    }
    Ok(outs)
}

/// The first layer output (blob order) where TFLM differs from the host
/// kernels on `image` (an image of the test set), or `None`.
pub fn first_divergence(
    blob: &OwnedModel,
    tflite: &Path,
    image: &[u8],
    tflm: &Tflm,
    work: &Path,
) -> Result<Option<Divergence>> {
    let input = int8_input(image)?;
    let path = work.join("one_input.bin");
    std::fs::write(&path, input.map(|x| x as u8))
        .with_context(|| format!("writing {}", path.display()))?;
    let model = blob.model()?;
    let layers: Vec<_> = model.layers().collect();
    let list = layers
        .iter()
        .map(|l| l.output.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let dumped = tflm.run(
        tflite,
        &path,
        &work.join("tensors.bin"),
        &["--tensors", &list],
    )?;
    let ours = host_layer_outputs(blob, &input)?;
    let mut at = 0;
    for (i, (layer, host)) in layers.iter().zip(&ours).enumerate() {
        let Some(theirs) = dumped.get(at..at + host.len()) else {
            bail!(
                "TFLM dumped {} bytes, fewer than the layer outputs need",
                dumped.len()
            );
        };
        at += host.len();
        let diff: Vec<usize> = (0..host.len())
            .filter(|&e| host[e] as u8 != theirs[e])
            .collect();
        if let Some(&element) = diff.first() {
            return Ok(Some(Divergence {
                layer: i as u16,
                name: layer.name.to_string(),
                tensor: layer.output,
                element,
                host: host[element],
                tflm: theirs[element] as i8,
                count: diff.len(),
            }));
        }
    }
    Ok(None)
}

/// The whole check as `host-trainer tflite-check` runs it: the venv (made
/// on demand), the `.tflite` file (`tflite`, else `blob` exported into
/// `work`), every image of `ds` through both, the summary printed, and on
/// a difference the first diverging layer of the first differing image.
pub fn run(
    blob: &OwnedModel,
    tflite: Option<&Path>,
    ds: &Dataset,
    work: &Path,
) -> Result<CheckReport> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let tflm = Tflm::setup(&workspace_util::workspace_root())?;
    let path = match tflite {
        Some(p) => p.to_path_buf(),
        None => {
            let p = work.join("model.tflite");
            super::write_tflite(blob, &p)?;
            p
        }
    };
    let report = check(blob, &path, ds, &tflm, work)?;
    println!("{}", report.summary());
    if let Some(&first) = report.differing.first() {
        match first_divergence(blob, &path, ds.image(first), &tflm, work)? {
            Some(d) => println!(
                "first divergence (test image {first}): layer {} `{}` (tensor {}), element {} \
                 (NHWC; {} elements of that tensor differ): shared {} vs TFLM {}",
                d.layer, d.name, d.tensor, d.element, d.count, d.host, d.tflm
            ),
            None => {
                println!("test image {first}: every layer output agrees, yet the logits differ")
            }
        }
    }
    Ok(report)
}
