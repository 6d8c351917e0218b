//! Stage 1: training in float. Data loading and augmentation, the model,
//! the fast CPU ops, the optimizer and schedules, checkpoints, the training
//! loop (`run.rs`, re-exported here), and the CPU-vs-device agreement check.

pub mod agreement;
pub mod augment;
pub mod camera_aug;
pub mod checkpoint;
pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
pub mod resident;
mod run;
pub mod schedule;
pub mod transfer;

pub use run::*;
