//! Stage 1: training in float. Data loading and augmentation, the model,
//! the fast CPU ops, the optimizer, schedules and weight averaging ([`ema`]
//! during a run, [`average`] of checkpoints), checkpoints, the training
//! loop (`run.rs`) with its recipes (`recipe.rs`) and reports (`report.rs`),
//! all three re-exported here, and the CPU-vs-device agreement check.

pub mod agreement;
pub mod augment;
pub mod average;
pub mod bn_refresh;
pub mod camera_aug;
pub mod checkpoint;
pub mod data;
pub mod distill;
pub mod ema;
pub mod model;
pub mod ops;
pub mod optim;
mod recipe;
mod report;
pub mod resident;
mod run;
pub mod schedule;
pub mod transfer;

pub use recipe::*;
pub use report::*;
pub use run::*;
