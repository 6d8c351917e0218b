//! Emits `cfg(armv7em)` when building for a Cortex-M4/M7 class target, so the
//! DSP (SMLAD/SXTB16) fast paths can be selected at compile time on stable
//! Rust, where `cfg(target_feature = "dsp")` is never set.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(armv7em)");
    println!("cargo::rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("thumbv7em-") {
        println!("cargo::rustc-cfg=armv7em");
    }
}
