//! Where the fast ops spend their time: wall-clock time per phase, summed
//! over calls while enabled (`host-trainer bench` and the `step_profile`
//! example turn it on). Timers sit on the calling thread around whole
//! parallel sections, so the phases add up to wall time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A phase of a training step inside the fast ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Convolution products (forward, input and weight gradients), with
    /// their padding copies and weight packing.
    Conv,
    /// BatchNorm statistics, normalization and its backward coefficients.
    Bn,
    /// Residual add + ReLU and max pool, forward and backward.
    Elementwise,
}

const PHASES: [Phase; 3] = [Phase::Conv, Phase::Bn, Phase::Elementwise];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Turns timing on or off (off by default: two clock reads per op).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Adds the time since `t0` to `phase` (when enabled).
pub fn add(phase: Phase, t0: Instant) {
    if ENABLED.load(Ordering::Relaxed) {
        let ns = t0.elapsed().as_nanos() as u64;
        NANOS[phase as usize].fetch_add(ns, Ordering::Relaxed);
    }
}

/// Seconds per phase since the last reset, then resets.
pub fn take() -> Vec<(Phase, f64)> {
    PHASES
        .iter()
        .map(|&p| {
            (
                p,
                NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9,
            )
        })
        .collect()
}

impl Phase {
    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Conv => "conv products",
            Self::Bn => "batch norm",
            Self::Elementwise => "add+ReLU, max pool",
        }
    }
}
