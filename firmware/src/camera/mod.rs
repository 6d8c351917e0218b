//! Camera drivers: register setup over SCCB/I2C, `no_std` and host-testable.
//!
//! * [`ov7670`]: OmniVision OV7670 configured for QQVGA (160x120) RGB565,
//!   captured on the board by DCMI (`board.rs`).
//!
//! Only the board image uses these drivers; the host stub and the QEMU image
//! compile them (and the host runs their unit tests) without calling them.
#![cfg_attr(
    not(all(target_os = "none", feature = "board", not(feature = "qemu"))),
    allow(dead_code)
)]

pub mod ov7670;
