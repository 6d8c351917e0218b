//! Mini-ResNet training on CIFAR-10 with candle (CPU, or CUDA behind the
//! `cuda` feature), and its conversion to the int8 model the firmware runs.
//!
//! The pipeline, by stage:
//!
//! 1. [`train`]: CIFAR-10 ([`data`], [`augment`]) → the float network
//!    ([`model`], on the CPU through the custom ops of [`ops`]) trained with
//!    [`optim`] and [`schedule`] into a [`checkpoint`];
//! 2. [`int8`]: checkpoint → BN folding, calibration, per-channel int8
//!    weights and TFLM requantization → the model blob in `shared`
//!    ([`export`], [`quantize`]), checked against the float model;
//! 3. [`mod@bench`]: training and inference speed against PyTorch ([`peer`]).
//!
//! The `host-trainer` binary is the command-line front end.

pub mod bench;
pub mod int8;
pub mod train;

pub use bench::peer;
pub use int8::{camera, export, quantize, ship};
pub use train::{
    agreement, augment, camera_aug, checkpoint, data, model, ops, optim, resident, schedule,
    transfer,
};
