//! # firmware
//!
//! The Cortex-M7 image that classifies camera frames with the int8
//! Mini-ResNet committed in `shared`.
//!
//! * **Board** (default features): NUCLEO-H743ZI2 at 480 MHz with an OV7670
//!   on DCMI; `cargo embed -p firmware` builds and flashes it, results go out
//!   over defmt/RTT. See `board.rs`.
//! * **QEMU** (`--no-default-features --features qemu`): `mps2-an500`;
//!   frames come from the host by semihosting and int8 logits plus exact
//!   instruction counts go back. See `qemu.rs`.
//! * **Host**: a stub `main`, so `cargo build`/`cargo test` at the workspace
//!   root work; the unit tests of `app` and `camera` run here.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

mod app;
mod camera;
#[cfg_attr(not(all(target_os = "none", feature = "qemu")), allow(dead_code))]
mod selftest;

#[cfg(all(target_os = "none", feature = "qemu"))]
mod qemu;

#[cfg(all(target_os = "none", feature = "board", not(feature = "qemu")))]
mod board;

#[cfg(all(target_os = "none", not(feature = "board"), not(feature = "qemu")))]
compile_error!("enable the `board` (default) or `qemu` feature");

/// Host stub: the firmware only runs on the MCU or in QEMU.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "firmware: this is the host stub. Build the board image with \
         `cargo build -p firmware --release --target thumbv7em-none-eabihf` or the QEMU \
         image with `--no-default-features --features qemu`."
    );
    // Keep the shared path linked on the host too.
    let _ = app::Engine::classify;
}
