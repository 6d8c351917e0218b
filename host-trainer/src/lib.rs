//! Mini-ResNet training (CPU, or CUDA behind the `cuda` feature) and its
//! conversion to the int8 model the firmware runs.
//!
//! The pipeline, by stage:
//!
//! 1. [`train`]: labelled images ([`data`]: CIFAR-10 or your own class
//!    folders; [`augment`], [`camera_aug`]) → the float network ([`model`],
//!    on the CPU through the custom ops of [`ops`]) trained with [`optim`]
//!    and [`schedule`], from scratch or from another run ([`transfer`]),
//!    into a [`checkpoint`];
//! 2. [`int8`]: checkpoint → BN folding, calibration, per-channel int8
//!    weights and TFLM requantization ([`quantize`]) → the model blob
//!    ([`blob`], [`export`]), checked against the float model, and shipped into
//!    `shared` only if it is not worse ([`ship`]); [`classify`] and the
//!    [`camera`] benchmark run the blob through the board's path; [`tflite`]
//!    writes it as a `.tflite` file that TFLite Micro runs bit for bit alike;
//! 3. [`mod@bench`]: training and inference speed against PyTorch ([`peer`]).
//!
//! The `host-trainer` binary is the command-line front end: argument
//! parsing and printing around these calls.

pub mod bench;
pub mod int8;
pub mod train;

pub use bench::peer;
pub use int8::{blob, camera, classify, export, quantize, ship, tflite};
pub use train::{
    agreement, augment, average, bn_refresh, camera_aug, checkpoint, data, distill, ema, model,
    ops, optim, resident, schedule, transfer,
};
