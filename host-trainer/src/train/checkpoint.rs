//! Checkpoints: model variables, momentum buffers, the weight averages of
//! a run with `--ema` or `--swa-from` and the run's metadata in one safetensors file,
//! written atomically and checked when read.
//!
//! The metadata holds a checksum of every tensor's bytes, so a damaged file
//! (a flipped bit, a NaN written by another tool) is an error naming the
//! file rather than a run that trains on; and a fingerprint of the training
//! set, so `--resume` refuses other data.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ema::{RunningAverage, AVG_PREFIX};
use crate::optim::Sgd;
use crate::train::{EpochMetrics, TrainConfig, Trainee};

/// Checkpoint format tag, stored in the safetensors metadata.
const CKPT_FORMAT: &str = "mini-resnet-checkpoint-v1";

/// What a checkpoint holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Run configuration.
    pub config: TrainConfig,
    /// Completed epochs.
    pub epoch: usize,
    /// Completed optimizer steps.
    pub iteration: usize,
    /// Metrics of every completed epoch.
    pub history: Vec<EpochMetrics>,
    /// The data the run trains and tests on (absent in checkpoints written
    /// before it was recorded).
    #[serde(default)]
    pub data: Option<DataFingerprint>,
}

/// Which data a run uses: sizes and [`crate::data::Dataset::fingerprint`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// Training images.
    pub train_images: usize,
    /// MD5 of the training set.
    pub train_md5: String,
    /// Test images.
    pub test_images: usize,
    /// MD5 of the test set.
    pub test_md5: String,
}

impl DataFingerprint {
    /// The fingerprint of a run's two sets.
    pub fn of(train: &crate::data::Dataset, test: &crate::data::Dataset) -> Self {
        Self {
            train_images: train.len(),
            train_md5: train.fingerprint(),
            test_images: test.len(),
            test_md5: test.fingerprint(),
        }
    }

    /// Checks that a resumed run sees the data it was trained on: another
    /// training set is an error, another test set a warning (its figures
    /// are then not comparable across the resume).
    pub fn check_resume(&self, now: &DataFingerprint) -> Result<()> {
        ensure!(
            self.train_md5 == now.train_md5,
            "--resume: the training set differs from the run's ({} images, MD5 {}; now {} images, MD5 {}). \
             Resume with the same --data and --train-limit, or start a new --run-dir",
            self.train_images,
            self.train_md5,
            now.train_images,
            now.train_md5
        );
        if self.test_md5 != now.test_md5 {
            eprintln!(
                "warning: --resume: the test set differs from the run's ({} images before, {} now): \
                 test figures before and after this point are not comparable",
                self.test_images, now.test_images
            );
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder,
/// fsync, rename. A crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    let write = || -> Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        drop(f);
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    };
    if let Err(e) = write() {
        // A full disk must not stay full of half-written temporaries.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// MD5 over every tensor's name, dtype, shape and bytes, in name order.
fn tensor_checksum(st: &safetensors::SafeTensors) -> String {
    use md5::{Digest, Md5};
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Md5::new();
    for (name, view) in views {
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", view.dtype(), view.shape()).as_bytes());
        h.update(view.data());
    }
    crate::data::hex(&h.finalize())
}

/// The first NaN or infinite element of `t` and its index, if any.
fn first_non_finite(t: &Tensor) -> Result<Option<(usize, f32)>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.into_iter().enumerate().find(|(_, x)| !x.is_finite()))
}

fn check_finite_metrics(path: &Path, meta: &CheckpointMeta) -> Result<()> {
    for m in &meta.history {
        let values = [
            ("train loss", m.train_loss),
            ("train accuracy", m.train_acc),
            ("test loss", m.test_loss),
            ("test accuracy", m.test_acc),
            ("learning rate", m.lr),
        ];
        if let Some((what, v)) = values.iter().find(|(_, v)| !v.is_finite()) {
            bail!(
                "not saving {}: the {what} of epoch {} is {v} (the run diverged); \
                 the file keeps the last good state",
                path.display(),
                m.epoch
            );
        }
    }
    Ok(())
}

/// Saves model variables, momentum buffers, the weight averages (if the
/// run keeps them) and `meta` to `path` (atomic).
///
/// A state with a non-finite value (a diverged run) is refused with an
/// error naming the tensor, and `path` keeps the last good state.
pub fn save_checkpoint(
    path: &Path,
    t: &Trainee,
    opt: &Sgd,
    avg: Option<&RunningAverage>,
    meta: &CheckpointMeta,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = t
        .named_vars()
        .into_iter()
        .map(|(n, v)| (format!("model.{n}"), v.as_tensor().clone()))
        .collect();
    tensors.extend(
        opt.state()
            .map(|(n, m)| (format!("momentum.{n}"), m.clone())),
    );
    tensors.extend(
        avg.into_iter()
            .flat_map(|e| e.tensors().map(|(n, a)| (n, a.clone()))),
    );
    for (name, tensor) in &tensors {
        if let Some((i, v)) = first_non_finite(tensor)? {
            bail!(
                "not saving {} (epoch {}): `{name}` holds {v} at element {i}; \
                 the file keeps the last good state",
                path.display(),
                meta.epoch,
            );
        }
    }
    check_finite_metrics(path, meta)?;
    write_checked(path, &tensors, meta, None)
}

/// Serializes `tensors` with `meta` (and the provenance line that marks a
/// weights-only file),
/// adds the checksum, and writes the file atomically.
fn write_checked(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &CheckpointMeta,
    provenance: Option<&str>,
) -> Result<()> {
    let mut info = HashMap::new();
    info.insert("format".to_string(), CKPT_FORMAT.to_string());
    info.insert("meta".to_string(), serde_json::to_string(meta)?);
    if let Some(p) = provenance {
        info.insert("provenance".to_string(), p.to_string());
    }
    let serialize = |info: &HashMap<String, String>| {
        safetensors::serialize(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(info.clone()),
        )
        .with_context(|| format!("serializing checkpoint {}", path.display()))
    };
    // The checksum covers the tensors' bytes as the file stores them.
    let draft = serialize(&info)?;
    let st = safetensors::SafeTensors::deserialize(&draft)
        .context("re-reading the serialized checkpoint")?;
    info.insert("checksum".to_string(), tensor_checksum(&st));
    write_atomic(path, &serialize(&info)?)
}

/// Writes the weights of `ck` that a model uses ([`Checkpoint::weights_prefix`]:
/// weights and batch-norm statistics, f32; no momentum) as `model.*` with
/// its metadata and a `provenance` line: the float checkpoint committed
/// next to the shipped model. It loads like any checkpoint for `eval`,
/// `export` and fine-tuning, but cannot be resumed.
pub fn save_weights(path: &Path, ck: &Checkpoint, provenance: &str) -> Result<()> {
    let prefix = ck.weights_prefix();
    let mut tensors: Vec<(String, Tensor)> = ck
        .tensors
        .iter()
        .filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n, t)))
        .map(|(n, t)| Ok((format!("model.{n}"), t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        !tensors.is_empty(),
        "{}: the checkpoint has no model tensors",
        path.display()
    );
    write_checked(path, &tensors, &ck.meta, Some(provenance))
}

/// The provenance line of a checkpoint written by [`save_weights`].
pub fn read_provenance(path: &Path) -> Result<Option<String>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("reading the metadata of {}", path.display()))?;
    Ok(m.metadata()
        .as_ref()
        .and_then(|i| i.get("provenance").cloned()))
}

/// A checkpoint read back: metadata and tensors by name.
#[derive(Debug)]
pub struct Checkpoint {
    /// Metadata.
    pub meta: CheckpointMeta,
    /// `model.*`, `momentum.*` and (with `--ema`/`--swa-from`) `avg.*` tensors.
    pub tensors: HashMap<String, Tensor>,
    /// The provenance line of a weights-only checkpoint (written by
    /// [`save_weights`]): where its weights came from.
    pub provenance: Option<String>,
}

impl Checkpoint {
    /// Written by [`save_weights`] (it has a provenance line): no optimizer
    /// state, cannot be resumed.
    pub fn weights_only(&self) -> bool {
        self.provenance.is_some()
    }

    /// The prefix of the weights a model built from this checkpoint uses:
    /// `avg.` (the averages) for a run with `--ema`, or with `--swa-from` once
    /// its average has begun; else `model.`.
    pub fn weights_prefix(&self) -> &'static str {
        if self.tensors.keys().any(|n| n.starts_with(AVG_PREFIX)) {
            AVG_PREFIX
        } else {
            "model."
        }
    }

    /// Where the weights come from: a weights-only checkpoint's provenance
    /// line, or else what its run's configuration says (recipe, epochs,
    /// batch, peak rate, augmentations, averaging, starting point).
    pub fn origin(&self) -> String {
        if let Some(p) = &self.provenance {
            return p.clone();
        }
        let c = &self.meta.config;
        let recipe = c.recipe.name();
        use crate::camera_aug::CameraAug;
        let aug = match (c.augment, &c.camera) {
            (false, _) => "no augmentation",
            (true, None) => "crop + flip",
            (true, Some(a)) if *a == CameraAug::standard() => "camera augmentations",
            (true, Some(a)) if *a == CameraAug::light() => "light camera augmentations",
            (true, Some(_)) => "camera augmentations (own strengths)",
        };
        let decay = serde_json::to_value(&c.schedule.decay)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str().map(String::from)))
            .unwrap_or_default();
        let mut s = format!(
            "recipe {recipe} run, epoch {} of {}, batch {}, lr {} ({decay}), {aug}",
            self.meta.epoch, c.epochs, c.batch_size, c.schedule.base_lr
        );
        let averaged = self.weights_prefix() == AVG_PREFIX;
        match (averaged, c.ema, c.swa_from) {
            (true, Some(d), _) => s += &format!(", EMA of the weights (decay {d})"),
            (true, None, Some(e)) => {
                s += &format!(", mean of the weights after epochs {e}-{}", self.meta.epoch)
            }
            _ => {}
        }
        if let Some(init) = &c.init {
            let head = if c.keep_head {
                "its head kept"
            } else {
                "a new head"
            };
            s += &format!(", started from {} ({head})", init.display());
        }
        if let Some(d) = &c.distill {
            let names: Vec<_> = d.teachers.iter().map(|p| p.display().to_string()).collect();
            s += &format!(
                ", distilled from {} (weight {}, temperature {})",
                names.join(" + "),
                d.weight,
                d.temperature
            );
        }
        s
    }
}

/// Reads a checkpoint written by [`save_checkpoint`].
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    let ctx = || format!("reading checkpoint {}", path.display());
    let bytes = fs::read(path).with_context(ctx)?;
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(ctx)?;
    let info = st_meta.metadata().clone().unwrap_or_default();
    match info.get("format").map(String::as_str) {
        Some(CKPT_FORMAT) => {}
        other => bail!(
            "{}: not a Mini-ResNet checkpoint (format {:?}, expected {CKPT_FORMAT:?})",
            path.display(),
            other
        ),
    }
    let meta: CheckpointMeta =
        serde_json::from_str(info.get("meta").map(String::as_str).unwrap_or(""))
            .with_context(|| format!("{}: damaged checkpoint metadata", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(ctx)?;
    match info.get("checksum") {
        Some(saved) => {
            let now = tensor_checksum(&st);
            ensure!(
                *saved == now,
                "{}: damaged checkpoint: its tensors' checksum is {now}, it was written as {saved}",
                path.display()
            );
        }
        None => eprintln!(
            "warning: {} has no checksum (written before checksums were kept); its tensors are not verified",
            path.display()
        ),
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).with_context(ctx)?;
    for (name, t) in &tensors {
        if let Some((i, v)) = first_non_finite(t)? {
            bail!(
                "{}: damaged checkpoint: `{name}` holds {v} at element {i}",
                path.display()
            );
        }
    }
    Ok(Checkpoint {
        meta,
        tensors,
        provenance: info.get("provenance").cloned(),
    })
}

/// The model a checkpoint holds, for evaluation, export and fine-tuning:
/// its weight averages if the run kept them ([`Checkpoint::weights_prefix`]),
/// else its weights, in a fresh model of its arch.
pub fn model_from_checkpoint(ck: &Checkpoint, device: &Device) -> Result<Trainee> {
    model_with_prefix(ck, ck.weights_prefix(), device)
}

/// The raw (trained, not averaged) weights of a checkpoint, to resume it.
pub fn raw_model_from_checkpoint(ck: &Checkpoint, device: &Device) -> Result<Trainee> {
    model_with_prefix(ck, "model.", device)
}

/// Loads a checkpoint's `<prefix>*` tensors into a fresh model of its arch.
fn model_with_prefix(ck: &Checkpoint, prefix: &str, device: &Device) -> Result<Trainee> {
    let t = Trainee::new(&ck.meta.config.arch, ck.meta.config.seed, device)?;
    for (name, var) in t.named_vars() {
        var.set(saved_tensor(
            &ck.tensors,
            &format!("{prefix}{name}"),
            var.dims(),
        )?)?;
    }
    Ok(t)
}

/// The saved tensor `key`, which must have the shape `dims` of the variable
/// it is for.
pub fn saved_tensor<'a>(
    tensors: &'a HashMap<String, Tensor>,
    key: &str,
    dims: &[usize],
) -> Result<&'a Tensor> {
    let saved = tensors
        .get(key)
        .with_context(|| format!("checkpoint lacks tensor `{key}`"))?;
    ensure!(
        saved.dims() == dims,
        "checkpoint tensor `{key}` has shape {:?}, the model needs {dims:?}",
        saved.dims()
    );
    Ok(saved)
}
