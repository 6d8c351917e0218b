//! `host-trainer bench`: training-step and inference throughput of a model
//! on random data, median of several timed runs after warm-up, and the
//! comparison with the same model in PyTorch ([`crate::peer`]).

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::model::{ArchConfig, Backend};
use crate::optim::{Sgd, SgdConfig};
use crate::peer::PeerResult;
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
    /// Inference GFLOP/s (forward MACs × 2 FLOP per image).
    pub infer_gflops: f64,
}

/// FLOP per image of one training step: forward, and a backward pass of
/// twice the forward's work (gradients of inputs and of weights).
pub fn train_flop_per_image(arch: &ArchConfig) -> f64 {
    3.0 * 2.0 * arch.macs() as f64
}

/// FLOP per image of one inference pass.
pub fn infer_flop_per_image(arch: &ArchConfig) -> f64 {
    2.0 * arch.macs() as f64
}

/// The peer's figures with the derived GFLOP/s and candle/peer ratios.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerFigures {
    /// Framework name.
    pub framework: String,
    /// What the peer reported.
    #[serde(flatten)]
    pub result: PeerResult,
    /// Training GFLOP/s.
    pub train_gflops: f64,
    /// Inference GFLOP/s.
    pub infer_gflops: f64,
    /// candle training images/s over the peer's.
    pub train_ratio: f64,
    /// candle inference images/s over the peer's.
    pub infer_ratio: f64,
}

/// Everything `host-trainer bench` reports: candle's figures (at the top
/// level of the JSON, as before) and the peer's, when one ran.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Compute device of the candle run.
    pub device: String,
    /// Threads given to both frameworks.
    pub threads: usize,
    /// Untimed warm-up runs.
    pub warmup: usize,
    /// Trainable parameters of the model.
    pub parameters: usize,
    /// Multiply-accumulates per image.
    pub macs_per_image: usize,
    /// candle's figures.
    #[serde(flatten)]
    pub candle: BenchResult,
    /// The peer's figures (`null` without one).
    pub peer: Option<PeerFigures>,
    /// candle with its stock ops instead of [`crate::ops`] (`--stock`).
    pub stock: Option<BenchResult>,
}

impl BenchReport {
    /// Combines candle's result with the peer's (if any).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        arch: &ArchConfig,
        device: &str,
        threads: usize,
        warmup: usize,
        candle: BenchResult,
        peer: Option<PeerResult>,
    ) -> Self {
        let peer = peer.map(|p| PeerFigures {
            framework: "pytorch".into(),
            train_gflops: p.train_images_per_sec * train_flop_per_image(arch) / 1e9,
            infer_gflops: p.infer_images_per_sec * infer_flop_per_image(arch) / 1e9,
            train_ratio: candle.train_images_per_sec / p.train_images_per_sec,
            infer_ratio: candle.infer_images_per_sec / p.infer_images_per_sec,
            result: p,
        });
        Self {
            device: device.into(),
            threads,
            warmup,
            parameters: arch.parameters(),
            macs_per_image: arch.macs(),
            candle,
            peer,
            stock: None,
        }
    }

    /// The human-readable table (Markdown).
    pub fn table(&self) -> String {
        let c = &self.candle;
        let mut s = format!(
            "Mini-ResNet, {} parameters, {:.2} M MACs/image; batch {}, {} threads, \
             median of {} runs after {} warm-up\n",
            self.parameters,
            self.macs_per_image as f64 / 1e6,
            c.batch_size,
            self.threads,
            c.runs,
            self.warmup,
        );
        match &self.peer {
            Some(p) => {
                s += &format!(
                    "\n| | candle {} images/s | GFLOP/s | PyTorch {} cpu images/s | GFLOP/s | candle/PyTorch |\n\
                     |---|---:|---:|---:|---:|---:|\n",
                    self.device, p.result.torch_version
                );
                s += &format!(
                    "| training step | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} |\n",
                    c.train_images_per_sec,
                    c.train_gflops,
                    p.result.train_images_per_sec,
                    p.train_gflops,
                    p.train_ratio
                );
                s += &format!(
                    "| inference | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} |\n",
                    c.infer_images_per_sec,
                    c.infer_gflops,
                    p.result.infer_images_per_sec,
                    p.infer_gflops,
                    p.infer_ratio
                );
            }
            None => {
                s += &format!(
                    "\n| | candle {} images/s | GFLOP/s |\n|---|---:|---:|\n",
                    self.device
                );
                s += &format!(
                    "| training step | {:.1} | {:.2} |\n",
                    c.train_images_per_sec, c.train_gflops
                );
                s += &format!(
                    "| inference | {:.1} | {:.2} |\n",
                    c.infer_images_per_sec, c.infer_gflops
                );
            }
        }
        if let Some(st) = &self.stock {
            s += &format!(
                "\nstock candle ops (candle's conv2d, conv_transpose2d backward, candle-nn BatchNorm): \
                 training {:.1} images/s, inference {:.1} images/s; the custom ops are {:.1}× and {:.1}× faster\n",
                st.train_images_per_sec,
                st.infer_images_per_sec,
                c.train_images_per_sec / st.train_images_per_sec,
                c.infer_images_per_sec / st.infer_images_per_sec,
            );
        }
        s
    }
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

/// Times `runs` training steps and `runs` inference batches after `warmup`,
/// with the device's default layer implementation.
pub fn bench(
    arch: &ArchConfig,
    batch_size: usize,
    warmup: usize,
    runs: usize,
    device: &Device,
) -> Result<BenchResult> {
    bench_backend(
        arch,
        batch_size,
        warmup,
        runs,
        device,
        Backend::for_device(device),
    )
}

/// [`bench`] with a chosen layer implementation.
pub fn bench_backend(
    arch: &ArchConfig,
    batch_size: usize,
    warmup: usize,
    runs: usize,
    device: &Device,
    backend: Backend,
) -> Result<BenchResult> {
    let mut t = Trainee::new(arch, 0, device)?;
    t.model.backend = backend;
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
    let infer_ips = batch_size as f64 / infer_s;
    Ok(BenchResult {
        batch_size,
        runs,
        train_images_per_sec: train_ips,
        infer_images_per_sec: infer_ips,
        train_gflops: train_ips * train_flop_per_image(arch) / 1e9,
        infer_gflops: infer_ips * infer_flop_per_image(arch) / 1e9,
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
        assert!(r.train_gflops > 0.0 && r.infer_gflops > 0.0);
        let stock = bench_backend(&arch, 4, 1, 2, &Device::Cpu, Backend::Stock).unwrap();
        let mut report = BenchReport::new(&arch, "cpu", 2, 1, r, None);
        report.stock = Some(stock);
        assert!(
            report.table().contains("stock candle ops"),
            "{}",
            report.table()
        );
    }

    #[test]
    fn bench_flop_counts_of_the_seed_model() {
        let arch = ArchConfig::seed();
        // 18.53 M MACs: about 111 MFLOP per training image, 37 per inference.
        assert_eq!((train_flop_per_image(&arch) / 1e6).round(), 111.0);
        assert_eq!((infer_flop_per_image(&arch) / 1e6).round(), 37.0);
    }

    fn candle_result() -> BenchResult {
        BenchResult {
            batch_size: 64,
            runs: 10,
            train_images_per_sec: 200.0,
            infer_images_per_sec: 1000.0,
            train_gflops: 22.2,
            infer_gflops: 37.1,
        }
    }

    #[test]
    fn bench_report_ratios_gflops_table_and_json() {
        let arch = ArchConfig::seed();
        let peer = PeerResult {
            torch_version: "2.15.0".into(),
            threads: 2,
            batch_size: 64,
            runs: 10,
            train_images_per_sec: 800.0,
            infer_images_per_sec: 2500.0,
        };
        let r = BenchReport::new(&arch, "cpu", 2, 3, candle_result(), Some(peer));
        let p = r.peer.as_ref().unwrap();
        assert_eq!(p.train_ratio, 0.25);
        assert_eq!(p.infer_ratio, 0.4);
        let want = 800.0 * 6.0 * arch.macs() as f64 / 1e9;
        assert!((p.train_gflops - want).abs() < 1e-9);
        let want = 2500.0 * 2.0 * arch.macs() as f64 / 1e9;
        assert!((p.infer_gflops - want).abs() < 1e-9);

        let t = r.table();
        assert!(
            t.contains("| training step | 200.0 | 22.20 | 800.0 |"),
            "{t}"
        );
        assert!(t.contains("| 0.25 |") && t.contains("| 0.40 |"), "{t}");
        assert!(t.contains("PyTorch 2.15.0"), "{t}");

        let j: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(j["train_images_per_sec"], 200.0); // candle stays at the top level
        assert_eq!(j["threads"], 2);
        assert_eq!(j["peer"]["framework"], "pytorch");
        assert_eq!(j["peer"]["torch_version"], "2.15.0");
        assert_eq!(j["peer"]["infer_images_per_sec"], 2500.0);
        assert_eq!(j["peer"]["train_ratio"], 0.25);
    }

    #[test]
    fn bench_report_without_a_peer() {
        let r = BenchReport::new(&ArchConfig::seed(), "cpu", 2, 3, candle_result(), None);
        let t = r.table();
        assert!(t.contains("| inference | 1000.0 | 37.10 |"), "{t}");
        assert!(!t.contains("PyTorch"), "{t}");
        assert!(serde_json::to_value(&r).unwrap()["peer"].is_null());
    }
}
