//! `cargo xtask <command>`: project automation without shell scripts.
//!
//! * `ci` — the one test command (README, `.ci/run`): sets the machine up,
//!   then runs formatting, clippy on host and Cortex-M7, rustdoc with
//!   warnings denied, the MCU builds, every test (the QEMU firmware test
//!   included) and the `cuda` feature's build (`scripts/ci-cuda.sh`).
//! * `bench-mcu [--json] [--update-snapshot]` — instructions per inference
//!   and per layer on the Cortex-M7 (QEMU, exact), flash/RAM of the board
//!   image, beside CMSIS-NN; `--update-snapshot` records the counts in
//!   `tests/snapshots/mcu-instructions.json`.
//! * `tflite-check [ARGS…]` — `host-trainer tflite-check ARGS…` in release:
//!   the CIFAR-10 test set through TensorFlow Lite Micro (Python venv made
//!   on demand in `tflite/.venv`) and through `shared::model::run`, logits
//!   compared byte for byte (docs/tflite.md). Needs PyPI once and the data
//!   set, so not part of `ci`.

mod bench_mcu;

use std::process::{Command, ExitCode};

use workspace_util::workspace_root;

const MCU_TARGET: &str = "thumbv7em-none-eabihf";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench-mcu") => bench_mcu::bench_mcu(
            args.iter().any(|a| a == "--json"),
            args.iter().any(|a| a == "--update-snapshot"),
        ),
        Some("tflite-check") => {
            let mut cmd = vec![
                "run",
                "-p",
                "host-trainer",
                "--release",
                "--",
                "tflite-check",
            ];
            cmd.extend(args[1..].iter().map(String::as_str));
            run("cargo", &cmd)
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <ci | bench-mcu [--json] [--update-snapshot] | tflite-check [ARGS…]>\n\n  \
                 ci            set up the machine, lint, build for the MCU and run every test\n  \
                 bench-mcu     instructions per inference (QEMU), flash/RAM, vs CMSIS-NN;\n                \
                 --update-snapshot writes tests/snapshots/mcu-instructions.json\n  \
                 tflite-check  the test set through TFLite Micro and shared::model::run, compared\n                \
                 byte for byte (host-trainer tflite-check --help; not part of ci)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `program args…` from the workspace root, failing on a non-zero exit.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    run_env(&[], program, args)
}

/// [`run`] with the environment variables `env` set for the command.
fn run_env(env: &[(&str, &str)], program: &str, args: &[&str]) -> Result<(), String> {
    let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}='{v}' ")).collect();
    eprintln!("\n$ {}{program} {}", shown.concat(), args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot start `{program}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed with {status}",
            args.join(" ")
        ))
    }
}

fn ci() -> Result<(), String> {
    // Setup: the MCU target (rust-toolchain.toml lists it too; this is for
    // rustup versions that do not install listed targets on their own).
    run("rustup", &["target", "add", MCU_TARGET])?;
    if Command::new("qemu-system-arm")
        .arg("--version")
        .output()
        .is_err()
    {
        run("apt-get", &["update"])?;
        run("apt-get", &["install", "-y", "qemu-system-arm"])?;
    }

    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The coverage-guided fuzz targets (run with cargo-fuzz on nightly,
    // docs/fuzzing.md) must keep compiling; a plain check needs neither.
    run(
        "cargo",
        &["check", "--locked", "--manifest-path", "fuzz/Cargo.toml"],
    )?;
    // Clippy on the MCU target: shared, the board image, the QEMU image.
    let mcu_builds: [&[&str]; 4] = [
        &["-p", "shared"],
        &["-p", "shared", "--features", "defmt"],
        &["-p", "firmware", "--release"],
        &[
            "-p",
            "firmware",
            "--release",
            "--no-default-features",
            "--features",
            "qemu",
        ],
    ];
    for pkg in mcu_builds {
        let mut args = vec!["clippy", "--target", MCU_TARGET];
        args.extend_from_slice(pkg);
        args.extend_from_slice(&["--", "-D", "warnings"]);
        run("cargo", &args)?;
    }
    // Rustdoc: broken intra-doc links and the like fail CI (host only, the
    // workspace's own crates).
    run_env(
        &[("RUSTDOCFLAGS", "-D warnings")],
        "cargo",
        &["doc", "--no-deps", "--workspace"],
    )?;
    run(
        "cargo",
        &["build", "-p", "shared", "--target", MCU_TARGET, "--release"],
    )?;
    // The board image: what `cargo embed -p firmware` flashes.
    run(
        "cargo",
        &[
            "build",
            "-p",
            "firmware",
            "--target",
            MCU_TARGET,
            "--release",
        ],
    )?;
    run("cargo", &["test", "--workspace", "--release"])?;
    // Last, as the slowest: the `cuda` feature builds and lints without a
    // GPU (CUDA compiler from PyPI, cached), and `--device cuda` fails
    // cleanly there. MINI_RESNET_SKIP_CUDA=1 skips it for quick local runs.
    if std::env::var_os("MINI_RESNET_SKIP_CUDA").is_some_and(|v| v == "1") {
        eprintln!("\nxtask ci: CUDA build SKIPPED (MINI_RESNET_SKIP_CUDA=1)");
    } else {
        run("bash", &["scripts/ci-cuda.sh"])?;
    }
    eprintln!("\nxtask ci: all checks passed");
    Ok(())
}
