//! Learning-rate schedules, as a function of the iteration (optimizer step).

use serde::{Deserialize, Serialize};

/// How the learning rate evolves over iterations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Decay {
    /// Constant.
    Constant,
    /// Multiply by `gamma` every `every` iterations (the seed's: ×0.1 every 4000).
    Step {
        /// Iterations between decays.
        every: usize,
        /// Factor applied at each decay.
        gamma: f64,
    },
    /// Multiply by `gamma` at each listed iteration.
    Milestones {
        /// Iterations at which to decay, ascending.
        at: Vec<usize>,
        /// Factor applied at each milestone.
        gamma: f64,
    },
    /// Linear decay from the base rate to 0 at `total` iterations.
    Linear {
        /// The iteration where the rate reaches 0.
        total: usize,
    },
    /// Half-cosine from the base rate to 0 at `total` iterations.
    Cosine {
        /// The iteration where the rate reaches 0.
        total: usize,
    },
}

/// A base rate, a decay rule and an optional linear warmup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Decay rule, applied from iteration 0 (warmup multiplies on top).
    pub decay: Decay,
    /// Iterations of linear warmup from `base_lr / warmup` to `base_lr`.
    pub warmup: usize,
}

impl Schedule {
    /// The learning rate for iteration `it` (0-based).
    pub fn lr(&self, it: usize) -> f64 {
        let decayed = match &self.decay {
            Decay::Constant => self.base_lr,
            Decay::Step { every, gamma } => {
                self.base_lr * gamma.powi((it / (*every).max(1)) as i32)
            }
            Decay::Milestones { at, gamma } => {
                self.base_lr * gamma.powi(at.iter().filter(|&&m| it >= m).count() as i32)
            }
            Decay::Linear { total } => {
                self.base_lr * (1.0 - it as f64 / (*total).max(1) as f64).max(0.0)
            }
            Decay::Cosine { total } => {
                let t = (it as f64 / (*total).max(1) as f64).min(1.0);
                self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        if it < self.warmup {
            decayed * (it + 1) as f64 / self.warmup as f64
        } else {
            decayed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn seed_step_decay() {
        let s = Schedule {
            base_lr: 0.1,
            decay: Decay::Step {
                every: 4000,
                gamma: 0.1,
            },
            warmup: 0,
        };
        assert!(close(s.lr(0), 0.1));
        assert!(close(s.lr(3999), 0.1));
        assert!(close(s.lr(4000), 0.01));
        assert!(close(s.lr(7999), 0.01));
        assert!(close(s.lr(8000), 0.001));
    }

    #[test]
    fn milestones() {
        let s = Schedule {
            base_lr: 1.0,
            decay: Decay::Milestones {
                at: vec![10, 20],
                gamma: 0.5,
            },
            warmup: 0,
        };
        assert_eq!(
            [s.lr(9), s.lr(10), s.lr(19), s.lr(20), s.lr(1000)],
            [1.0, 0.5, 0.5, 0.25, 0.25]
        );
    }

    #[test]
    fn warmup_then_linear_and_cosine() {
        let s = Schedule {
            base_lr: 0.4,
            decay: Decay::Linear { total: 100 },
            warmup: 4,
        };
        assert!(close(s.lr(0), 0.4 * 1.0 * 0.25));
        assert!(close(s.lr(3), 0.4 * 0.97));
        assert!(close(s.lr(50), 0.2));
        assert!(close(s.lr(100), 0.0));
        assert!(close(s.lr(150), 0.0));
        let c = Schedule {
            base_lr: 2.0,
            decay: Decay::Cosine { total: 10 },
            warmup: 0,
        };
        assert!(close(c.lr(0), 2.0));
        assert!(close(c.lr(5), 1.0));
        assert!(close(c.lr(10), 0.0));
    }
}
