//! Helpers for the cross-crate checks in `tests/tests/*.rs` and for
//! `cargo xtask bench-mcu`: building the QEMU firmware image, making camera
//! frames, and running the image under `qemu-system-arm -M mps2-an500`.

pub mod qemu;
