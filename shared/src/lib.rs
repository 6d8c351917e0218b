//! # shared
//!
//! The code that runs both on the host and on the Cortex-M7: `no_std`, no
//! heap, no floating point in any kernel.
//!
//! | module | what |
//! |---|---|
//! | [`quant`] | TFLM fixed-point requantization: the authoritative rounding (`kernels::dsp::requant` re-derives it for speed, tested bit-exact) |
//! | [`kernels`] | int8 conv / max pool / avg pool / residual add / fully connected; Cortex-M7 fast paths in `kernels::dsp` |
//! | [`model`] | int8 model blob: format, zero-copy parsing, validation, whole-network `run` |
//! | [`preprocess`] | camera frame (RGB565/RGB888, any size) → 32x32x3 int8 input |
//! | [`Error`] | what a kernel or frame can get wrong |
//! | `rng` | SplitMix64 test data for the unit tests and the firmware's self-test (feature `rng`) |
//!
//! Kernels check their arguments and return [`Error`] rather than panic;
//! once the checks pass they cannot fail.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod error;
pub mod kernels;
pub mod model;
pub mod preprocess;
pub mod quant;
#[cfg(any(test, feature = "rng"))]
pub mod rng;

pub use error::Error;

/// CIFAR-10 class names in the official label order (the model's output order).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
