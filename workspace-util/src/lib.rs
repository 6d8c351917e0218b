//! # workspace-util
//!
//! Small host-side helpers that `host-trainer`, `tests` and `xtask` share,
//! so each has one definition. Nothing here runs on the MCU (see `shared`
//! for what does).

use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the top `Cargo.toml`), from where
/// this crate was built.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace-util lives one level below the workspace root")
        .to_path_buf()
}

/// The median of `v`: its middle value, or the mean of the two middle
/// values for an even count (values ordered by `f64::total_cmp`).
///
/// # Panics
///
/// If `v` is empty.
pub fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty(), "the median of no values");
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
