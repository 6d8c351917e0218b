//! `host-trainer bench`: training-step and inference throughput of a model
//! on random data, median of several timed runs after warm-up.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::model::ArchConfig;
use crate::optim::{Sgd, SgdConfig};
use crate::train::{smoothed_cross_entropy, Trainee};

/// Throughput figures, images per second (medians).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// Batch size used.
    pub batch_size: usize,
    /// Timed runs per figure.
    pub runs: usize,
    /// Forward + backward + SGD step.
    pub train_images_per_sec: f64,
    /// Forward only, eval mode.
    pub infer_images_per_sec: f64,
    /// Training GFLOP/s (3 × forward MACs × 2 FLOP per image).
    pub train_gflops: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times `runs` training steps and `runs` inference batches after `warmup`.
pub fn bench(
    arch: &ArchConfig,
    batch_size: usize,
    warmup: usize,
    runs: usize,
    device: &Device,
) -> Result<BenchResult> {
    let t = Trainee::new(arch, 0, device)?;
    let mut opt = Sgd::new(
        t.named_vars(),
        SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
        },
    );
    let x = Tensor::randn(0f32, 1.0, (batch_size, 3, 32, 32), device)?;
    let y = Tensor::from_vec(
        (0..batch_size as u32)
            .map(|i| i % arch.classes as u32)
            .collect::<Vec<_>>(),
        batch_size,
        device,
    )?;
    let mut train_times = Vec::new();
    for i in 0..warmup + runs {
        let t0 = Instant::now();
        let loss = smoothed_cross_entropy(&t.model.forward_t(&x, true)?, &y, 0.1)?;
        let grads = loss.backward()?;
        opt.step(&grads, 0.01)?;
        let _ = loss.to_scalar::<f32>()?; // synchronize
        if i >= warmup {
            train_times.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut infer_times = Vec::new();
    for i in 0..warmup + runs {
        let t0 = Instant::now();
        let logits = t.model.forward_t(&x, false)?;
        let _ = logits.sum_all()?.to_scalar::<f32>()?;
        if i >= warmup {
            infer_times.push(t0.elapsed().as_secs_f64());
        }
    }
    let train_s = median(train_times);
    let infer_s = median(infer_times);
    let train_ips = batch_size as f64 / train_s;
    Ok(BenchResult {
        batch_size,
        runs,
        train_images_per_sec: train_ips,
        infer_images_per_sec: batch_size as f64 / infer_s,
        train_gflops: train_ips * 3.0 * 2.0 * arch.macs() as f64 / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn bench_runs_on_a_tiny_model() {
        let arch = ArchConfig {
            widths: vec![4],
            blocks: vec![1],
            maxpool: true,
            classes: 10,
        };
        let r = bench(&arch, 4, 1, 2, &Device::Cpu).unwrap();
        assert!(r.train_images_per_sec > 0.0 && r.infer_images_per_sec > 0.0);
    }
}
