//! Export of the int8 model as a TensorFlow Lite flatbuffer (schema v3)
//! that the TFLite Micro interpreter runs bit for bit like
//! `shared::model::run`, and the check that it does.
//!
//! * [`plan`]: the blob's layers as TFLite tensors and ops (int8
//!   activations, per-channel symmetric int8 filters, int32 biases; CONV_2D,
//!   MAX_POOL_2D, ADD, AVERAGE_POOL_2D, FULLY_CONNECTED, with PAD / PADV2
//!   where TFLite's SAME padding differs from ours), with per-channel
//!   `float32` filter scales from which TFLM derives the blob's exact
//!   multipliers;
//! * [`encode`]: that graph written with the `flatbuffers` crate through
//!   the Rust module flatc generated from the official `schema.fbs`
//!   ([`schema`]), class names in the model's description and metadata;
//! * [`read`]: the file parsed back (verified) into a summary, for tests;
//! * [`check`]: every CIFAR-10 test image through TFLM (Python
//!   `tflite_micro`, in `tflite/.venv`) and through `shared::model::run`.

pub mod check;
pub mod encode;
pub mod plan;
pub mod read;
#[rustfmt::skip]
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn,
    missing_docs,
    missing_debug_implementations,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    deprecated,
    rustdoc::all
)]
#[path = "schema_generated.rs"]
pub mod schema;

pub use encode::{export_tflite, ExportReport};

use std::path::Path;

use anyhow::{Context, Result};

use crate::blob::OwnedModel;
use crate::checkpoint::write_atomic;

/// Writes `blob` as a `.tflite` file at `path` (atomically), with the
/// blob's class names; prints the [`ExportReport`]'s warning, if any.
pub fn write_tflite(blob: &OwnedModel, path: &Path) -> Result<ExportReport> {
    let model = blob.model()?;
    let (bytes, report) =
        export_tflite(&model).with_context(|| format!("exporting {} as TFLite", path.display()))?;
    write_atomic(path, &bytes)?;
    if let Some(w) = report.warning() {
        eprintln!("warning: {w}");
    }
    println!(
        "TFLite model ({} bytes, {} ops, {} tensors) written to {}",
        bytes.len(),
        report.ops,
        report.tensors,
        path.display()
    );
    Ok(report)
}
