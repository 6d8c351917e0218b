//! Mini-ResNet training on CIFAR-10 with candle (CPU, or CUDA behind the
//! `cuda` feature): data loading, model, optimizer, schedules, training
//! loop with checkpoints, evaluation and benchmarks.
//!
//! The `host-trainer` binary is the command-line front end.

pub mod agreement;
pub mod augment;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod export;
pub mod model;
pub mod ops;
pub mod optim;
pub mod peer;
pub mod quantize;
pub mod resident;
pub mod schedule;
pub mod train;
