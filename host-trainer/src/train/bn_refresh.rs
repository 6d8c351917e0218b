//! Batch-norm statistics recomputed for averaged weights.
//!
//! The mean of several epochs' weights (SWA, [`crate::average`],
//! [`crate::ema`]) is a network that none of those epochs ran, and the mean
//! of their BN running statistics only approximates its own. [`refresh`]
//! runs training images (no augmentation, in a shuffled order) through it
//! in training mode and sets every BN layer's running mean and variance to
//! those of all the images it saw there (SWA's `bn_update`, Izmailov et al.
//! 2018), for `average --refresh-bn`.
//!
//! The variance is the pooled one (the mean of `var + mean²` over the
//! batches, minus the squared mean), not the mean of the batch variances,
//! which leaves out how the batches' means differ.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, Var};

use crate::data::Dataset;
use crate::model::{MiniResNet, BN_MOMENTUM};
use crate::resident::Batches;

/// Sets the running statistics of every BN layer of `model` to the mean
/// and variance of its input over `images` training images of `ds` (the
/// first of a fixed shuffled order; all of them when `images` is larger),
/// run `batch` at a time in training mode. Returns the number of images
/// used.
pub fn refresh(
    model: &MiniResNet,
    ds: &Dataset,
    images: usize,
    batch: usize,
    device: &Device,
) -> Result<usize> {
    let n = images.min(ds.len());
    ensure!(
        n >= 2 && batch >= 2,
        "BN refresh needs batches of at least 2 images (images {n}, batch {batch})"
    );
    // Shuffled: a data set stored class by class would otherwise give
    // batches of one class, normalized in training mode unlike any other.
    let mut idx = crate::augment::epoch_order(ds.len(), 0, 0);
    idx.truncate(n);
    let layers = model.conv_bns();
    let mut sums: Vec<(Vec<f64>, Vec<f64>)> = layers
        .iter()
        .map(|l| {
            (
                vec![0.0; l.bn.running_mean().elem_count()],
                vec![0.0; l.bn.running_var().elem_count()],
            )
        })
        .collect();
    let batches = Batches::new(ds, device)?;
    let mut used = 0;
    // A last chunk of one image has no variance: it is left out.
    for chunk in idx.chunks(batch).filter(|c| c.len() >= 2) {
        for l in &layers {
            zero(l.bn.running_mean())?;
            zero(l.bn.running_var())?;
        }
        let (x, _) = batches.batch(chunk, None)?;
        model.forward_t(&x, true)?;
        // From zero, one update leaves `momentum × batch statistic`.
        for (l, (s1, s2)) in layers.iter().zip(&mut sums) {
            let mean = scaled(l.bn.running_mean())?;
            let var = scaled(l.bn.running_var())?;
            let w = chunk.len() as f64;
            for ((a, b), (m, v)) in s1
                .iter_mut()
                .zip(s2.iter_mut())
                .zip(mean.into_iter().zip(var))
            {
                *a += w * m;
                *b += w * (v + m * m);
            }
        }
        used += chunk.len();
    }
    let count = used as f64;
    for (l, (s1, s2)) in layers.iter().zip(&sums) {
        let mean: Vec<f64> = s1.iter().map(|a| a / count).collect();
        let var: Vec<f64> = s2
            .iter()
            .zip(&mean)
            .map(|(b, m)| (b / count - m * m).max(0.0))
            .collect();
        set(l.bn.running_mean(), &mean)?;
        set(l.bn.running_var(), &var)?;
    }
    Ok(used)
}

fn zero(t: &Tensor) -> Result<()> {
    Ok(Var::from_tensor(t)?.set(&t.zeros_like()?)?)
}

/// A running statistic updated once from zero, divided by the momentum:
/// the batch's statistic.
fn scaled(t: &Tensor) -> Result<Vec<f64>> {
    let v: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    Ok(v.into_iter().map(|x| f64::from(x) / BN_MOMENTUM).collect())
}

fn set(t: &Tensor, values: &[f64]) -> Result<()> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Ok(Var::from_tensor(t)?.set(&Tensor::from_vec(v, t.dims(), t.device())?)?)
}

/// [`refresh`] on the weights of `ck` (its average, for a run that keeps
/// one), which then holds them as a weights-only checkpoint's `model.*`
/// tensors. Returns the number of images used.
pub fn refresh_checkpoint(
    ck: &mut crate::checkpoint::Checkpoint,
    ds: &Dataset,
    images: usize,
    device: &Device,
) -> Result<usize> {
    let t = crate::checkpoint::model_from_checkpoint(ck, device)?;
    let used = refresh(&t.model, ds, images, 256, device)?;
    ck.tensors = t
        .named_vars()
        .into_iter()
        .map(|(name, var)| (format!("model.{name}"), var.as_tensor().clone()))
        .collect();
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ArchConfig;
    use crate::train::Trainee;

    fn stats(t: &Tensor) -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The stem's input does not depend on any batch norm, so its refreshed
    /// statistics must be those of the stem convolution's output over all
    /// the images, computed here directly, whatever the batches: 40 images
    /// of 4 classes stored class-interleaved, in batches of 16, 16 and 8.
    #[test]
    fn stem_statistics_are_those_of_all_images() {
        let ds = crate::data::synthetic(40, 4, 5);
        let arch = ArchConfig {
            widths: vec![4, 8],
            blocks: vec![1, 1],
            maxpool: true,
            classes: 4,
        };
        let t = Trainee::new(&arch, 1, &Device::Cpu).unwrap();
        assert_eq!(refresh(&t.model, &ds, 1000, 16, &Device::Cpu).unwrap(), 40);
        let all: Vec<usize> = (0..40).collect();
        let (x, _) = Batches::new(&ds, &Device::Cpu)
            .unwrap()
            .batch(&all, None)
            .unwrap();
        use candle_core::Module;
        let y = t.model.stem.conv.forward(&x).unwrap(); // (N, C, H, W)
        let per_channel = y
            .transpose(0, 1)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let mean = stats(&per_channel.mean(1).unwrap());
        let centred = per_channel
            .broadcast_sub(&per_channel.mean_keepdim(1).unwrap())
            .unwrap();
        let var = stats(&centred.sqr().unwrap().mean(1).unwrap());
        let (got_mean, got_var) = (
            stats(t.model.stem.bn.running_mean()),
            stats(t.model.stem.bn.running_var()),
        );
        for c in 0..4 {
            assert!(
                (got_mean[c] - mean[c]).abs() < 1e-4 * (1.0 + mean[c].abs()),
                "mean {c}"
            );
            // Within the batches' unbiasing factor c/(c-1), c = 8x32x32 or more.
            assert!(
                (got_var[c] / var[c] - 1.0).abs() < 1e-3,
                "var {c}: {} vs {}",
                got_var[c],
                var[c]
            );
        }
        // Every layer was set: none keeps the initial mean 0, variance 1.
        for l in t.model.conv_bns() {
            assert!(stats(l.bn.running_var())
                .iter()
                .all(|&v| v != 1.0 && v > 0.0));
        }
        let e = refresh(&t.model, &ds, 1, 16, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
    }
}
