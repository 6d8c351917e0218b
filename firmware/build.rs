//! Picks the linker script for the MCU builds: `memory-h743.x` for the
//! board (default), `memory-mps2-an500.x` with `--features qemu`. Host
//! builds (the stub `main` and unit tests) link nothing special.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=memory-h743.x");
    println!("cargo::rerun-if-changed=memory-mps2-an500.x");
    let target = env::var("TARGET").unwrap_or_default();
    if !target.starts_with("thumbv") {
        return;
    }
    let qemu = env::var_os("CARGO_FEATURE_QEMU").is_some();
    let src = if qemu {
        "memory-mps2-an500.x"
    } else {
        "memory-h743.x"
    };
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    fs::copy(src, out.join("memory.x")).expect("copying the memory layout");
    println!("cargo::rustc-link-search={}", out.display());
    println!("cargo::rustc-link-arg-bins=--nmagic");
    println!("cargo::rustc-link-arg-bins=-Tlink.x");
    if !qemu {
        println!("cargo::rustc-link-arg-bins=-Tdefmt.x");
        // defmt compiles out everything below `error` unless DEFMT_LOG says
        // otherwise; the board reports its results with `info!`.
        println!("cargo::rerun-if-env-changed=DEFMT_LOG");
        if env::var_os("DEFMT_LOG").is_none() {
            println!("cargo::rustc-env=DEFMT_LOG=info");
        }
    }
}
