//! Where a training step's time goes: forward, backward and optimizer
//! medians at batch 64 on random data (`cargo run --release -p host-trainer
//! --example step_profile`).

use std::time::Instant;

use candle_core::{Device, Tensor};
use host_trainer::model::ArchConfig;
use host_trainer::optim::{Sgd, SgdConfig};
use host_trainer::train::{smoothed_cross_entropy, Trainee};
use workspace_util::median;

fn main() -> anyhow::Result<()> {
    host_trainer::ops::configure_threads(None)?;
    host_trainer::ops::on_worker(profile)
}

fn profile() -> anyhow::Result<()> {
    host_trainer::ops::profile::enable(true);
    let dev = Device::Cpu;
    let arch = ArchConfig::seed();
    let t = Trainee::new(&arch, 0, &dev)?;
    let cfg = SgdConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    };
    let mut opt = Sgd::new(t.named_vars(), cfg);
    let x = Tensor::randn(0f32, 1.0, (64, 3, 32, 32), &dev)?;
    let y = Tensor::from_vec((0..64u32).map(|i| i % 10).collect::<Vec<_>>(), 64, &dev)?;
    let (mut f, mut b, mut o) = (vec![], vec![], vec![]);
    for i in 0..12 {
        let t0 = Instant::now();
        let loss = smoothed_cross_entropy(&t.model.forward_t(&x, true)?, &y, 0.1)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, 0.01)?;
        let t3 = Instant::now();
        let phases = host_trainer::ops::profile::take();
        if i == 11 {
            for (p, s) in phases {
                println!("  {}: {:.1} ms", p.name(), s * 1e3);
            }
        }
        if i >= 2 {
            f.push((t1 - t0).as_secs_f64());
            b.push((t2 - t1).as_secs_f64());
            o.push((t3 - t2).as_secs_f64());
        }
    }
    let mut inf = vec![];
    for i in 0..12 {
        let t0 = Instant::now();
        let _ = t.model.forward_t(&x, false)?.to_vec2::<f32>()?;
        let phases = host_trainer::ops::profile::take();
        if i >= 2 {
            inf.push(t0.elapsed().as_secs_f64());
        }
        if i == 11 {
            println!("inference, last batch:");
            for (p, s) in phases {
                println!("  {}: {:.1} ms", p.name(), s * 1e3);
            }
        }
    }
    let inf = median(&inf);
    println!("inference {:.1} ms = {:.0} images/s", inf * 1e3, 64.0 / inf);
    let (f, b, o) = (median(&f), median(&b), median(&o));
    println!(
        "forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms, total {:.1} ms = {:.0} images/s",
        f * 1e3,
        b * 1e3,
        o * 1e3,
        (f + b + o) * 1e3,
        64.0 / (f + b + o)
    );
    Ok(())
}
