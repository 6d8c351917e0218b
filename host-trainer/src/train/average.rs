//! Weight averaging of checkpoints (stochastic weight averaging, SWA):
//! `host-trainer average --out F CK...` averages the weights and BN running
//! statistics of several checkpoints of one architecture, typically the
//! per-epoch checkpoints of a run's last phase, into a weights-only
//! checkpoint that `eval`, `export` and fine-tuning read like any other.
//!
//! Checkpoints of one run at a constant learning rate sit around a minimum
//! that SGD circles without reaching; their mean lies closer to its centre.
//! The BN statistics are averaged like the weights (not recomputed), which
//! is close enough when the checkpoints are close: the test accuracy of the
//! result, which `export` and `eval` measure, says whether it was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{load_checkpoint, model_from_checkpoint, Checkpoint};

/// The mean of the model weights of the checkpoints at `paths` (their
/// averages for runs with `--ema`), as a weights-only checkpoint with the
/// last one's metadata and a provenance text naming what was averaged.
pub fn average_checkpoints(paths: &[PathBuf], device: &Device) -> Result<Checkpoint> {
    ensure!(
        paths.len() >= 2,
        "average: give at least two checkpoints (got {})",
        paths.len()
    );
    let mut sums: Vec<(String, Tensor)> = Vec::new();
    let mut last = None;
    let mut epochs = Vec::with_capacity(paths.len());
    for path in paths {
        let ck = load_checkpoint(path, device)
            .with_context(|| format!("average: reading {}", path.display()))?;
        if let Some(first) = &last {
            same_arch(first, &ck, &paths[0], path)?;
        }
        let vars = model_from_checkpoint(&ck, device)
            .with_context(|| format!("average: {}", path.display()))?
            .named_vars();
        if sums.is_empty() {
            for (n, v) in vars {
                sums.push((n, v.as_tensor().to_dtype(DType::F64)?));
            }
        } else {
            for ((_, sum), (_, v)) in sums.iter_mut().zip(vars) {
                *sum = (&*sum + v.as_tensor().to_dtype(DType::F64)?)?;
            }
        }
        epochs.push(ck.meta.epoch);
        last = Some(ck);
    }
    let last = last.expect("at least two checkpoints");
    let n = paths.len() as f64;
    let tensors: HashMap<String, Tensor> = sums
        .into_iter()
        .map(|(name, sum)| Ok((format!("model.{name}"), (sum / n)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    Ok(Checkpoint {
        meta: last.meta,
        tensors,
        provenance: Some(describe(paths, &epochs)),
    })
}

/// Checkpoints of different architectures cannot be averaged.
fn same_arch(first: &Checkpoint, ck: &Checkpoint, first_path: &Path, path: &Path) -> Result<()> {
    let (a, b) = (&first.meta.config.arch, &ck.meta.config.arch);
    ensure!(
        a == b,
        "average: {} holds widths {:?}, blocks {:?}, max pool {}, {} classes; {} holds widths {:?}, \
         blocks {:?}, max pool {}, {} classes: only checkpoints of one architecture can be averaged",
        path.display(),
        b.widths,
        b.blocks,
        b.maxpool,
        b.classes,
        first_path.display(),
        a.widths,
        a.blocks,
        a.maxpool,
        a.classes
    );
    Ok(())
}

/// `average of 50 checkpoints of runs/x (epochs 151-200)`, or the list of
/// epochs when they are not one consecutive range.
fn describe(paths: &[PathBuf], epochs: &[usize]) -> String {
    let mut dirs: Vec<String> = paths
        .iter()
        .map(|p| p.parent().unwrap_or(Path::new(".")).display().to_string())
        .collect();
    dirs.dedup();
    let consecutive = epochs.windows(2).all(|w| w[1] == w[0] + 1);
    let epochs = if consecutive {
        format!("epochs {}-{}", epochs[0], epochs[epochs.len() - 1])
    } else {
        let list: Vec<String> = epochs.iter().map(usize::to_string).collect();
        format!("epochs {}", list.join(", "))
    };
    format!(
        "average of {} checkpoints of {} ({epochs})",
        paths.len(),
        dirs.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{read_provenance, save_weights};
    use crate::train::{train, Recipe, RunOptions, TrainConfig};

    fn values(ck: &Checkpoint, name: &str) -> Vec<f32> {
        ck.tensors[name].flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Two epochs' checkpoints of a toy run: every averaged tensor is the
    /// element-wise mean, the file loads as a weights-only checkpoint with
    /// its provenance, and bad inputs are refused with the file named.
    #[test]
    fn averages_element_wise_and_refuses_mixed_architectures() {
        let train_set = crate::data::synthetic(64, 4, 1);
        let test_set = crate::data::synthetic(32, 4, 2);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg =
            TrainConfig::from_recipe(Recipe::Default, 64, Some(2), Some(16), Some(0.05)).unwrap();
        cfg.arch = crate::model::ArchConfig {
            widths: vec![4, 8],
            blocks: vec![1, 1],
            maxpool: true,
            classes: 4,
        };
        let run = dir.path().join("run");
        let mut paths = Vec::new();
        for epoch in 1..=2 {
            let opts = RunOptions {
                run_dir: run.clone(),
                resume: epoch > 1,
                eval_batch: 32,
                stop_after: Some(1),
                progress: false,
            };
            train(cfg.clone(), &train_set, &test_set, &opts, &Device::Cpu).unwrap();
            let p = dir.path().join(format!("epoch-{epoch}.safetensors"));
            std::fs::copy(run.join("checkpoint.safetensors"), &p).unwrap();
            paths.push(p);
        }
        let avg = average_checkpoints(&paths, &Device::Cpu).unwrap();
        let what = avg.provenance.clone().unwrap();
        assert!(what.ends_with("(epochs 1-2)"), "{what}");
        let cks: Vec<Checkpoint> = paths
            .iter()
            .map(|p| load_checkpoint(p, &Device::Cpu).unwrap())
            .collect();
        let mut differ = 0;
        for name in avg.tensors.keys() {
            let (a, b) = (values(&cks[0], name), values(&cks[1], name));
            differ += usize::from(a != b);
            for ((m, x), y) in values(&avg, name).iter().zip(&a).zip(&b) {
                let want = ((f64::from(*x) + f64::from(*y)) / 2.0) as f32;
                assert_eq!(m.to_bits(), want.to_bits(), "{name}");
            }
        }
        assert!(differ > 0, "the two epochs' weights should differ");
        assert!(avg.tensors.contains_key("model.stem.bn.running_mean"));

        let out = dir.path().join("avg.safetensors");
        save_weights(&out, &avg, &what).unwrap();
        let back = load_checkpoint(&out, &Device::Cpu).unwrap();
        assert!(back.weights_only());
        assert_eq!(read_provenance(&out).unwrap().as_deref(), Some(&*what));
        assert_eq!(back.meta.epoch, 2);

        let e = average_checkpoints(&paths[..1], &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("at least two"), "{e}");

        let mut other = cfg.clone();
        other.arch.widths = vec![4, 4];
        let odir = dir.path().join("other");
        let opts = RunOptions {
            run_dir: odir.clone(),
            resume: false,
            eval_batch: 32,
            stop_after: Some(1),
            progress: false,
        };
        train(other, &train_set, &test_set, &opts, &Device::Cpu).unwrap();
        let mixed = [paths[0].clone(), odir.join("checkpoint.safetensors")];
        let e = format!(
            "{:#}",
            average_checkpoints(&mixed, &Device::Cpu).unwrap_err()
        );
        assert!(e.contains("one architecture") && e.contains("other"), "{e}");
    }
}
