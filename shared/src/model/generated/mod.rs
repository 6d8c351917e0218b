//! Placeholder until `host-trainer export` writes the real model.
use super::Aligned;

/// Blob format version this file was generated for.
pub const GENERATED_FORMAT_VERSION: u16 = 1;
const _: () = assert!(GENERATED_FORMAT_VERSION == super::FORMAT_VERSION);
/// Activation arena bytes the model needs.
pub const ARENA_LEN: usize = 0;
/// Conv scratch (`i16` elements) the model needs.
pub const SCRATCH_LEN: usize = 0;
static BLOB_BYTES: Aligned<[u8; 0]> = Aligned([]);
/// The model blob.
pub static BLOB: &Aligned<[u8]> = &BLOB_BYTES;
