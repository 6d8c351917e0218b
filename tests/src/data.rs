//! Where the tests find CIFAR-10 images.
//!
//! Every test in `cargo xtask ci` runs on a fresh clone with nothing beside
//! it: the images they need are the **shipped subset**,
//! `tests/data/cifar10-test-200/test_batch.bin` (200 test images in the
//! official binary format, see that folder's README). The **full data set**
//! (`$MINI_RESNET_DATA`, else the team copy `../shared/data/cifar10-jpeg`
//! beside the workspace) is optional: checks that need it print why they
//! are skipped when it is absent (see [`skip`]).

use std::io::Write;
use std::path::PathBuf;

use crate::qemu::workspace_root;

/// Folder of the shipped subset (holds `test_batch.bin`, so the trainer's
/// reader sees it as an official binary release with a test split only).
pub fn subset_dir() -> PathBuf {
    workspace_root().join("tests/data/cifar10-test-200")
}

/// Where the full data set is looked for: `$MINI_RESNET_DATA`, else
/// `../shared/data/cifar10-jpeg` beside the workspace.
pub fn full_data_path() -> PathBuf {
    std::env::var_os("MINI_RESNET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data/cifar10-jpeg"))
}

/// The full data set's path if it exists; else prints the skip reason for
/// `test` (see [`skip`]) and returns `None`.
pub fn full_data_or_skip(test: &str) -> Option<PathBuf> {
    let p = full_data_path();
    if p.exists() {
        Some(p)
    } else {
        skip(
            test,
            &format!(
                "no CIFAR-10 data at {} (set MINI_RESNET_DATA to run it)",
                p.display()
            ),
        );
        None
    }
}

/// Prints `SKIPPED <test>: <reason>` straight to the process's stderr,
/// past the test harness's output capture, so a skipped check is visible
/// in a passing `cargo test` run.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
