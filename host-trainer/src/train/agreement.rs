//! CPU-vs-device agreement: the same training steps on the CPU training
//! path (the custom ops of [`crate::ops`]) and on another device (stock
//! candle ops, e.g. CUDA), compared tensor by tensor.
//!
//! Both models start from the same weights and see the same batches. The
//! check runs two optimizer steps of the default recipe's update (Nesterov
//! SGD with weight decay, label-smoothed loss; two steps so the momentum
//! buffers take part), then compares:
//!
//! * the first step's logits, loss and every parameter gradient;
//! * every variable after the second step (weights, BN running statistics)
//!   and every momentum buffer;
//! * eval-mode logits after the second step, and their top-1 classes.
//!
//! The measure is the relative L2 error `‖dev − cpu‖ / ‖cpu‖` (0 when both
//! are 0). Two correct float32 implementations differ only by summation
//! order, which a 37-layer network with batch norm amplifies to about 1e-5
//! in the forward pass and 1e-4 in gradients; the tolerances below leave
//! a margin of ten over that and are far below what a wrong kernel gives
//! (a missing term or a wrong index is an error of order 1).

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::data::Dataset;
use crate::model::{ArchConfig, Backend};
use crate::optim::{Sgd, SgdConfig};
use crate::resident::Resident;
use crate::train::{smoothed_cross_entropy, Trainee};

/// Learning rate of the two compared steps: small enough that the second
/// step's gradients are taken at nearly the same weights on both sides
/// (at 0.1 the second step amplifies rounding differences a thousandfold).
const LR: f64 = 0.01;

/// Tolerance on the relative L2 error of forward values (logits, loss).
pub const TOL_FORWARD: f64 = 1e-4;
/// Tolerances on the first step's gradients: (each tensor, all together).
pub const TOL_GRADIENT: (f64, f64) = (5e-2, 5e-3);
/// Tolerances on the variables after two steps (relative to their values).
pub const TOL_STEPPED: (f64, f64) = (2e-2, 2e-3);
/// Tolerances on the momentum buffers after two steps: the second step's
/// gradients are taken where ReLU and max-pool decisions may already
/// differ, so these are looser.
pub const TOL_MOMENTUM: (f64, f64) = (5e-1, 5e-2);
/// Tolerance on the eval-mode logits after two steps.
pub const TOL_EVAL: f64 = 1e-2;

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was compared.
    pub name: String,
    /// `‖dev − cpu‖₂ / ‖cpu‖₂`.
    pub rel_l2: f64,
    /// Largest `|dev − cpu|`.
    pub max_abs: f64,
    /// The tolerance on `rel_l2`.
    pub tolerance: f64,
}

impl Row {
    /// Whether the error is within tolerance (NaN never is).
    pub fn ok(&self) -> bool {
        self.rel_l2 <= self.tolerance
    }
}

/// The outcome of [`compare`].
#[derive(Debug, Clone)]
pub struct Report {
    /// Every compared tensor.
    pub rows: Vec<Row>,
    /// Images whose eval-mode top-1 class is the same on both.
    pub same_top1: usize,
    /// Images compared.
    pub images: usize,
}

impl Report {
    /// Rows over tolerance.
    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| !r.ok()).collect()
    }

    /// Whether every row is within tolerance and at most 1% of the images
    /// change their top-1 class.
    pub fn passed(&self) -> bool {
        self.failures().is_empty() && self.same_top1 * 100 >= self.images * 99
    }

    /// Per kind of tensor (name before `:`): the row over all tensors of
    /// the kind, and the worst single tensor.
    pub fn summary(&self) -> String {
        let kind = |r: &Row| r.name.split(':').next().unwrap_or("").to_string();
        let mut kinds: Vec<String> = self.rows.iter().map(kind).collect();
        kinds.dedup();
        let mut s = format!(
            "{:<44} {:>10} {:>9} {:>10}\n",
            "compared", "rel L2", "tolerance", "max |diff|"
        );
        let mut line = |r: &Row| {
            s.push_str(&format!(
                "{:<44} {:>10.2e} {:>9.0e} {:>10.2e}{}\n",
                r.name,
                r.rel_l2,
                r.tolerance,
                r.max_abs,
                if r.ok() { "" } else { "  OVER" }
            ))
        };
        for k in kinds {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| kind(r) == k).collect();
            let all = rows.iter().find(|r| r.name.contains(" together"));
            if let Some(all) = all {
                line(all);
            }
            let worst = rows
                .iter()
                .filter(|r| !r.name.contains(" together"))
                .max_by(|a, b| a.rel_l2.total_cmp(&b.rel_l2));
            if let Some(w) = worst {
                line(w);
            }
        }
        s.push_str(&format!(
            "eval top-1 agreement: {}/{} images\n",
            self.same_top1, self.images
        ));
        s
    }
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?)
}

/// Squared differences, squared reference norm and largest difference.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    diff: f64,
    norm: f64,
    max_abs: f64,
}

impl Sums {
    fn of(name: &str, cpu: &Tensor, dev: &Tensor) -> Result<Self> {
        ensure!(
            cpu.dims() == dev.dims(),
            "{name}: shape {:?} on the CPU, {:?} on the device",
            cpu.dims(),
            dev.dims()
        );
        let (a, b) = (values(cpu)?, values(dev)?);
        let mut s = Sums::default();
        for (p, q) in a.iter().zip(&b) {
            s.diff += (q - p) * (q - p);
            s.norm += p * p;
            // `max` would drop a NaN: keep it visible.
            s.max_abs = if (q - p).is_nan() {
                f64::NAN
            } else {
                s.max_abs.max((q - p).abs())
            };
        }
        Ok(s)
    }

    fn add(self, o: Sums) -> Sums {
        Sums {
            diff: self.diff + o.diff,
            norm: self.norm + o.norm,
            max_abs: if o.max_abs.is_nan() {
                o.max_abs
            } else {
                self.max_abs.max(o.max_abs)
            },
        }
    }

    fn row(self, name: String, tolerance: f64) -> Row {
        // A NaN anywhere makes `diff` NaN, which fails `Row::ok`.
        let rel_l2 = if self.diff == 0.0 {
            0.0
        } else {
            (self.diff / self.norm).sqrt()
        };
        Row {
            name,
            rel_l2,
            max_abs: self.max_abs,
            tolerance,
        }
    }
}

fn row(name: String, cpu: &Tensor, dev: &Tensor, tolerance: f64) -> Result<Row> {
    Ok(Sums::of(&name, cpu, dev)?.row(name, tolerance))
}

/// Everything one side of the comparison produces.
struct Side {
    logits: Tensor,
    loss: Tensor,
    grads: Vec<(String, Tensor)>,
    vars: Vec<(String, Tensor)>,
    momentum: Vec<(String, Tensor)>,
    eval: Tensor,
}

/// Sets every BN scale and shift to a fixed value that differs per
/// variable. The initialization starts each residual branch's last BN
/// scale at 0, which would leave that branch's forward output and most of
/// its gradients exactly 0 on both sides, comparing nothing.
fn spread_bn(t: &Trainee) -> Result<()> {
    for (k, (name, var)) in t.named_vars().into_iter().enumerate() {
        if name.contains(".bn") && (name.ends_with(".weight") || name.ends_with(".bias")) {
            let base = if name.ends_with(".weight") { 0.6 } else { 0.05 };
            let v = var.ones_like()?.affine(base + 0.01 * (k % 7) as f64, 0.0)?;
            var.set(&v)?;
        }
    }
    Ok(())
}

fn run_side(
    arch: &ArchConfig,
    device: &Device,
    backend: Backend,
    data: &Dataset,
    steps: &[Vec<usize>; 2],
) -> Result<Side> {
    let t = Trainee::new(arch, 11, device)?;
    spread_bn(&t)?;
    let mut model = t.model.clone();
    model.backend = backend;
    let sgd = SgdConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    };
    let mut opt = Sgd::new(t.named_vars(), sgd);
    let images = Resident::upload(data, device)?;
    let mut first = None;
    for (k, idx) in steps.iter().enumerate() {
        let (x, y) = images.batch(idx, Some((5, k)))?;
        let logits = model.forward_t(&x, true)?;
        let loss = smoothed_cross_entropy(&logits, &y, 0.1)?;
        let grads = loss.backward()?;
        if first.is_none() {
            let g = t
                .named_vars()
                .into_iter()
                .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n, g.clone())))
                .collect();
            first = Some((logits, loss, g));
        }
        opt.step(&grads, LR)?;
    }
    let (logits, loss, grads) = first.expect("two steps ran");
    let all: Vec<usize> = steps.concat();
    let (x, _) = images.batch(&all, None)?;
    let eval = model.forward_t(&x, false)?;
    Ok(Side {
        logits,
        loss,
        grads,
        vars: t
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect(),
        momentum: opt
            .state()
            .map(|(n, m)| (n.to_string(), m.clone()))
            .collect(),
        eval,
    })
}

/// One row per tensor pair (tolerance `each`), then one over all of them
/// together (tolerance `all`).
fn pair_rows(
    kind: &str,
    cpu: &[(String, Tensor)],
    dev: &[(String, Tensor)],
    (each, all): (f64, f64),
    out: &mut Vec<Row>,
) -> Result<()> {
    ensure!(
        cpu.len() == dev.len(),
        "{kind}: {} tensors on the CPU, {} on the device",
        cpu.len(),
        dev.len()
    );
    let mut total = Sums::default();
    for ((n, a), (m, b)) in cpu.iter().zip(dev) {
        ensure!(n == m, "{kind}: `{n}` on the CPU pairs with `{m}`");
        let name = format!("{kind}: {n}");
        let sums = Sums::of(&name, a, b)?;
        total = total.add(sums);
        out.push(sums.row(name, each));
    }
    out.push(total.row(format!("{kind}: all {} together", cpu.len()), all));
    Ok(())
}

/// Runs the comparison on `arch` with two batches of `batch` images from
/// `data` (augmented): the CPU training path against `backend` on `device`.
pub fn compare(
    arch: &ArchConfig,
    data: &Dataset,
    batch: usize,
    device: &Device,
    backend: Backend,
) -> Result<Report> {
    ensure!(
        batch >= 2 && data.len() >= 2 * batch,
        "the agreement check needs two batches of {batch} images, the data has {}",
        data.len()
    );
    let steps = [
        (0..batch).collect::<Vec<_>>(),
        (batch..2 * batch).collect::<Vec<_>>(),
    ];
    let cpu = run_side(arch, &Device::Cpu, Backend::FastCpu, data, &steps)?;
    let dev = run_side(arch, device, backend, data, &steps)?;
    let mut rows = vec![
        row(
            "logits (step 1)".into(),
            &cpu.logits,
            &dev.logits,
            TOL_FORWARD,
        )?,
        row("loss (step 1)".into(), &cpu.loss, &dev.loss, TOL_FORWARD)?,
    ];
    pair_rows("gradient", &cpu.grads, &dev.grads, TOL_GRADIENT, &mut rows)?;
    pair_rows(
        "after 2 steps",
        &cpu.vars,
        &dev.vars,
        TOL_STEPPED,
        &mut rows,
    )?;
    pair_rows(
        "momentum",
        &cpu.momentum,
        &dev.momentum,
        TOL_MOMENTUM,
        &mut rows,
    )?;
    rows.push(row("eval logits".into(), &cpu.eval, &dev.eval, TOL_EVAL)?);
    let top = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1()?)
    };
    let (a, b) = (top(&cpu.eval)?, top(&dev.eval)?);
    let same_top1 = a.iter().zip(&b).filter(|(p, q)| p == q).count();
    Ok(Report {
        rows,
        same_top1,
        images: a.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;

    fn small() -> ArchConfig {
        ArchConfig {
            widths: vec![4, 8],
            blocks: vec![2, 1],
            maxpool: true,
            classes: 10,
        }
    }

    /// On the CPU, the stock candle ops stand in for the device: the check
    /// passes, and it compares real, non-zero tensors.
    #[test]
    fn cpu_fast_ops_agree_with_stock_ops() {
        let data = synthetic(16, 10, 2);
        let r = compare(&small(), &data, 8, &Device::Cpu, Backend::Stock).unwrap();
        assert!(r.passed(), "{}", r.summary());
        assert_eq!(r.images, 16);
        assert!(r.rows.len() > 20);
        assert!(r.rows.iter().any(|r| r.max_abs > 0.0), "{}", r.summary());
    }

    /// A wrong result is caught: one gradient off by 1% fails.
    #[test]
    fn a_perturbed_tensor_fails() {
        let a = Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let b = (&a * 1.01).unwrap();
        let r = row("x".into(), &a, &b, 1e-3).unwrap();
        assert!(!r.ok() && (r.rel_l2 - 0.01).abs() < 1e-6, "{r:?}");
        let nan = Tensor::new(&[1f32, f32::NAN, 3.0], &Device::Cpu).unwrap();
        assert!(!row("n".into(), &a, &nan, 1.0).unwrap().ok());
        assert!(row("z".into(), &a, &a, 0.0).unwrap().ok());
    }

    /// The real check on CUDA (run by `scripts/gpu-check.sh`).
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_agrees_with_cpu() {
        let device = Device::new_cuda(0).unwrap();
        let data = synthetic(128, 10, 4);
        let r = compare(&ArchConfig::seed(), &data, 64, &device, Backend::Stock).unwrap();
        eprintln!("{}", r.summary());
        assert!(r.passed(), "{}", r.summary());
    }
}
