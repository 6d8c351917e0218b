//! Stage 2: from a float checkpoint to the int8 model blob. BN folding,
//! calibration, per-channel quantization with TFLM requantization
//! ([`quantize`]), blob writing ([`blob`]), and the export with its float-vs-int8 comparison
//! ([`export`]); shipping into `shared` ([`ship`]); the camera-realism benchmark of an int8 model
//! ([`camera`]); the same model as a TensorFlow Lite file that TFLite
//! Micro runs bit for bit alike, and the check that it does ([`tflite`]).

pub mod blob;
pub mod camera;
pub mod classify;
pub mod export;
pub mod quantize;
pub mod ship;
pub mod tflite;
