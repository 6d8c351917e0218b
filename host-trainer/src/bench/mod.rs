//! `host-trainer bench`: training-step and inference throughput of a model
//! on random data, median of several timed runs after warm-up, and the
//! comparison with the same model in PyTorch ([`crate::peer`]).

pub mod peer;

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use workspace_util::median;

use crate::bench::peer::PeerResult;
use crate::model::{ArchConfig, Backend};
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
    /// Inference GFLOP/s (forward MACs × 2 FLOP per image).
    pub infer_gflops: f64,
    /// Where a training step's time goes (the fast CPU ops only).
    pub phases: Option<StepPhases>,
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

/// Mean time per training step of each part of candle's step, in ms
/// (the fast CPU ops' own timers, [`crate::ops::profile`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepPhases {
    /// Convolution products: forward, input and weight gradients, with
    /// their padding copies and weight packing.
    pub conv_ms: f64,
    /// BatchNorm statistics, normalization and backward coefficients.
    pub bn_ms: f64,
    /// Residual add + ReLU and max pool, forward and backward.
    pub elementwise_ms: f64,
    /// The SGD update.
    pub optimizer_ms: f64,
    /// Everything else: candle's graph and autograd, input layout, pooling,
    /// FC, loss, BN running statistics.
    pub other_ms: f64,
    /// The whole step.
    pub step_ms: f64,
}

/// One PyTorch run in one memory format.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerLayout {
    /// `NCHW` or `channels-last`.
    pub layout: String,
    /// What the peer reported.
    #[serde(flatten)]
    pub result: PeerResult,
}

/// The peer at its best: per figure, the faster of its memory formats.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerFigures {
    /// Framework name.
    pub framework: String,
    /// Its version.
    pub torch_version: String,
    /// Every run, one per memory format.
    pub layouts: Vec<PeerLayout>,
    /// Best training images/s, and the layout that gave it.
    pub train_images_per_sec: f64,
    /// Layout of the best training figure.
    pub train_layout: String,
    /// Best inference images/s.
    pub infer_images_per_sec: f64,
    /// Layout of the best inference figure.
    pub infer_layout: String,
    /// Training GFLOP/s (best).
    pub train_gflops: f64,
    /// Inference GFLOP/s (best).
    pub infer_gflops: f64,
    /// candle training images/s over the peer's best.
    pub train_ratio: f64,
    /// candle inference images/s over the peer's best.
    pub infer_ratio: f64,
}

impl PeerFigures {
    fn best(arch: &ArchConfig, candle: &BenchResult, layouts: Vec<PeerLayout>) -> Option<Self> {
        let pick = |f: fn(&PeerResult) -> f64| {
            layouts
                .iter()
                .max_by(|a, b| f(&a.result).total_cmp(&f(&b.result)))
                .map(|l| (f(&l.result), l.layout.clone()))
        };
        let (train, train_layout) = pick(|r| r.train_images_per_sec)?;
        let (infer, infer_layout) = pick(|r| r.infer_images_per_sec)?;
        Some(Self {
            framework: "pytorch".into(),
            torch_version: layouts[0].result.torch_version.clone(),
            train_images_per_sec: train,
            train_layout,
            infer_images_per_sec: infer,
            infer_layout,
            train_gflops: train * train_flop_per_image(arch) / 1e9,
            infer_gflops: infer * infer_flop_per_image(arch) / 1e9,
            train_ratio: candle.train_images_per_sec / train,
            infer_ratio: candle.infer_images_per_sec / infer,
            layouts,
        })
    }
}

/// Everything `host-trainer bench` reports: candle's figures (at the top
/// level of the JSON, as before) and the peer's, when one ran.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Compute device of the candle run.
    pub device: String,
    /// The CPU's model name.
    pub cpu: String,
    /// The instruction set the fast CPU ops dispatched to.
    pub isa: String,
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

/// The CPU's model name (`/proc/cpuinfo`), or "unknown CPU".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

impl BenchReport {
    /// Combines candle's result with the peer's runs (none, or one per
    /// memory format).
    pub fn new(
        arch: &ArchConfig,
        device: &str,
        threads: usize,
        warmup: usize,
        candle: BenchResult,
        peer: Vec<PeerLayout>,
    ) -> Self {
        Self {
            device: device.into(),
            cpu: cpu_model(),
            isa: format!("{} (runtime dispatch)", crate::ops::Isa::detect().name()),
            threads,
            warmup,
            parameters: arch.parameters(),
            macs_per_image: arch.macs(),
            peer: PeerFigures::best(arch, &candle, peer),
            candle,
            stock: None,
        }
    }

    /// The human-readable table (Markdown).
    pub fn table(&self) -> String {
        let c = &self.candle;
        let mut s = format!(
            "Mini-ResNet, {} parameters, {:.2} M MACs/image; batch {}, {} threads, \
             median of {} runs after {} warm-up\nCPU: {}; candle's fast ops: {}\n",
            self.parameters,
            self.macs_per_image as f64 / 1e6,
            c.batch_size,
            self.threads,
            c.runs,
            self.warmup,
            self.cpu,
            self.isa,
        );
        match &self.peer {
            Some(p) => s += &self.peer_table(p),
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
        if let Some(ph) = &c.phases {
            s += &format!(
                "\ncandle training step, mean ms: conv products {:.1}, batch norm {:.1}, \
                 add+ReLU and max pool {:.1}, optimizer {:.1}, graph and the rest {:.1}; \
                 step {:.1}\n",
                ph.conv_ms, ph.bn_ms, ph.elementwise_ms, ph.optimizer_ms, ph.other_ms, ph.step_ms
            );
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

    fn peer_table(&self, p: &PeerFigures) -> String {
        let c = &self.candle;
        let mut s = format!(
            "\n| | candle {} images/s | GFLOP/s | PyTorch {} cpu images/s (best layout) | GFLOP/s | candle/PyTorch |\n\
             |---|---:|---:|---:|---:|---:|\n",
            self.device, p.torch_version
        );
        s += &format!(
            "| training step | {:.1} | {:.2} | {:.1} ({}) | {:.2} | {:.2} |\n",
            c.train_images_per_sec,
            c.train_gflops,
            p.train_images_per_sec,
            p.train_layout,
            p.train_gflops,
            p.train_ratio
        );
        s += &format!(
            "| inference | {:.1} | {:.2} | {:.1} ({}) | {:.2} | {:.2} |\n",
            c.infer_images_per_sec,
            c.infer_gflops,
            p.infer_images_per_sec,
            p.infer_layout,
            p.infer_gflops,
            p.infer_ratio
        );
        for l in &p.layouts {
            s += &format!(
                "\nPyTorch {}: training {:.1} images/s, inference {:.1} images/s",
                l.layout, l.result.train_images_per_sec, l.result.infer_images_per_sec
            );
        }
        s + "\n"
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

/// [`bench()`] with a chosen layer implementation.
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
    let mut opt_s = 0.0;
    let profiled = backend == Backend::FastCpu;
    crate::ops::profile::enable(profiled);
    for i in 0..warmup + runs {
        if i == warmup {
            crate::ops::profile::take(); // drop the warm-up's figures
        }
        let t0 = Instant::now();
        let loss = smoothed_cross_entropy(&t.model.forward_t(&x, true)?, &y, 0.1)?;
        let grads = loss.backward()?;
        let t_opt = Instant::now();
        opt.step(&grads, 0.01)?;
        let _ = loss.to_scalar::<f32>()?; // synchronize
        if i >= warmup {
            opt_s += t_opt.elapsed().as_secs_f64();
            train_times.push(t0.elapsed().as_secs_f64());
        }
    }
    let phases = profiled.then(|| step_phases(&train_times, opt_s));
    crate::ops::profile::enable(false);
    let mut infer_times = Vec::new();
    for i in 0..warmup + runs {
        let t0 = Instant::now();
        let logits = t.model.forward_t(&x, false)?;
        let _ = logits.sum_all()?.to_scalar::<f32>()?;
        if i >= warmup {
            infer_times.push(t0.elapsed().as_secs_f64());
        }
    }
    let train_s = median(&train_times);
    let infer_s = median(&infer_times);
    let train_ips = batch_size as f64 / train_s;
    let infer_ips = batch_size as f64 / infer_s;
    Ok(BenchResult {
        batch_size,
        runs,
        train_images_per_sec: train_ips,
        infer_images_per_sec: infer_ips,
        train_gflops: train_ips * train_flop_per_image(arch) / 1e9,
        infer_gflops: infer_ips * infer_flop_per_image(arch) / 1e9,
        phases,
    })
}

/// Mean per-step split of the timed training steps.
fn step_phases(steps: &[f64], optimizer_s: f64) -> StepPhases {
    use crate::ops::profile::Phase;
    let n = steps.len().max(1) as f64;
    let ms = |s: f64| s * 1e3 / n;
    let mut p = StepPhases {
        optimizer_ms: ms(optimizer_s),
        step_ms: ms(steps.iter().sum()),
        ..Default::default()
    };
    for (phase, s) in crate::ops::profile::take() {
        match phase {
            Phase::Conv => p.conv_ms = ms(s),
            Phase::Bn => p.bn_ms = ms(s),
            Phase::Elementwise => p.elementwise_ms = ms(s),
        }
    }
    p.other_ms = p.step_ms - p.conv_ms - p.bn_ms - p.elementwise_ms - p.optimizer_ms;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Only conv time is sure to be there: tests running at the same
        // time add their own ops' time to the global timers.
        assert!(r.phases.as_ref().is_some_and(|p| p.conv_ms > 0.0));
        let mut report = BenchReport::new(&arch, "cpu", 2, 1, r, Vec::new());
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
            phases: None,
        }
    }

    #[test]
    fn bench_report_ratios_gflops_table_and_json() {
        let arch = ArchConfig::seed();
        let run = |layout: &str, train, infer| PeerLayout {
            layout: layout.into(),
            result: PeerResult {
                torch_version: "2.15.0".into(),
                threads: 2,
                batch_size: 64,
                runs: 10,
                train_images_per_sec: train,
                infer_images_per_sec: infer,
            },
        };
        // Each figure takes the faster layout.
        let peer = vec![
            run("NCHW", 800.0, 2000.0),
            run("channels-last", 700.0, 2500.0),
        ];
        let r = BenchReport::new(&arch, "cpu", 2, 3, candle_result(), peer);
        let p = r.peer.as_ref().unwrap();
        assert_eq!(p.train_ratio, 0.25);
        assert_eq!(p.infer_ratio, 0.4);
        let want = 800.0 * 6.0 * arch.macs() as f64 / 1e9;
        assert!((p.train_gflops - want).abs() < 1e-9);
        let want = 2500.0 * 2.0 * arch.macs() as f64 / 1e9;
        assert!((p.infer_gflops - want).abs() < 1e-9);

        let t = r.table();
        assert!(
            t.contains("| training step | 200.0 | 22.20 | 800.0 (NCHW) |"),
            "{t}"
        );
        assert!(t.contains("| 2500.0 (channels-last) |"), "{t}");
        assert_eq!(p.layouts.len(), 2);
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
        let r = BenchReport::new(
            &ArchConfig::seed(),
            "cpu",
            2,
            3,
            candle_result(),
            Vec::new(),
        );
        let t = r.table();
        assert!(t.contains("| inference | 1000.0 | 37.10 |"), "{t}");
        assert!(!t.contains("PyTorch"), "{t}");
        assert!(serde_json::to_value(&r).unwrap()["peer"].is_null());
    }
}
