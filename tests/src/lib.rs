//! Helpers for the cross-crate checks in `tests/tests/*.rs` and for
//! `cargo xtask bench-mcu`: building the QEMU firmware image, making camera
//! frames, running the image under `qemu-system-arm -M mps2-an500`, and the
//! instruction-count snapshot; where the tests find CIFAR-10 images.

pub mod data;
pub mod qemu;
pub mod snapshot;
