//! The instruction-count snapshot of the shipped model on the Cortex-M7
//! (QEMU `mps2-an500`, `-icount shift=0`): `tests/snapshots/mcu-instructions.json`.
//!
//! Instruction counts under `-icount` are exact and deterministic (to the
//! 40-instruction SysTick granularity), so this is a regression check, not
//! a timing test: `tests/tests/qemu.rs` fails when the measured total grows
//! by more than [`TOLERANCE`] over the snapshot, and prints a reminder to
//! update it when the total drops by more. Update it with
//! `cargo xtask bench-mcu --update-snapshot`.

use std::path::PathBuf;

use crate::qemu::workspace_root;

/// Allowed growth of the total over the snapshot (and the drop after which
/// updating the snapshot is suggested).
pub const TOLERANCE: f64 = 0.02;

/// The snapshot file, relative to the workspace root.
pub const SNAPSHOT_FILE: &str = "tests/snapshots/mcu-instructions.json";

/// A recorded measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Instructions per inference (network only, preprocessing apart).
    pub total: u64,
    /// `(layer name, instructions)` in execution order.
    pub layers: Vec<(String, u64)>,
}

/// Absolute path of the snapshot file.
pub fn path() -> PathBuf {
    workspace_root().join(SNAPSHOT_FILE)
}

impl Snapshot {
    /// Reads the committed snapshot.
    pub fn read() -> Result<Snapshot, String> {
        let p = path();
        let text =
            std::fs::read_to_string(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let total = v["instructions_total"]
            .as_u64()
            .ok_or(format!("{}: no instructions_total", p.display()))?;
        let layers = v["layers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| {
                        Some((l["name"].as_str()?.to_string(), l["instructions"].as_u64()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Snapshot { total, layers })
    }

    /// Writes the snapshot (pretty JSON, one layer per line).
    pub fn write(&self) -> Result<(), String> {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|(n, i)| serde_json::json!({"name": n, "instructions": i}))
            .collect();
        let v = serde_json::json!({
            "about": "Cortex-M7 instructions per inference of the shipped model (QEMU mps2-an500, -icount shift=0). Written by `cargo xtask bench-mcu --update-snapshot`; tests/tests/qemu.rs fails if the total grows by more than 2%.",
            "instructions_total": self.total,
            "layers": layers,
        });
        let p = path();
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())? + "\n";
        std::fs::write(&p, text).map_err(|e| format!("writing {}: {e}", p.display()))
    }

    /// Compares a measured total with the snapshot: `Err` if it grew by more
    /// than [`TOLERANCE`], `Ok(Some(hint))` if it dropped by more, else `Ok(None)`.
    pub fn check(&self, measured: u64) -> Result<Option<String>, String> {
        let ratio = measured as f64 / self.total as f64;
        if ratio > 1.0 + TOLERANCE {
            Err(format!(
                "instructions per inference grew from {} (snapshot) to {measured} (+{:.2}%, more than {:.0}%): \
                 find the regression, or if it is intended run `cargo xtask bench-mcu --update-snapshot`",
                self.total,
                (ratio - 1.0) * 100.0,
                TOLERANCE * 100.0
            ))
        } else if ratio < 1.0 - TOLERANCE {
            Ok(Some(format!(
                "instructions per inference dropped from {} (snapshot) to {measured} ({:.2}%): \
                 run `cargo xtask bench-mcu --update-snapshot` to record the gain",
                self.total,
                (ratio - 1.0) * 100.0
            )))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_bounds() {
        let s = Snapshot {
            total: 1000,
            layers: vec![],
        };
        assert_eq!(s.check(1020), Ok(None));
        assert!(s.check(1021).is_err());
        assert_eq!(s.check(980), Ok(None));
        assert!(s.check(979).unwrap().is_some());
    }

    #[test]
    fn committed_snapshot_parses() {
        let s = Snapshot::read().expect("tests/snapshots/mcu-instructions.json");
        assert!(s.total > 0);
        assert_eq!(
            s.total,
            s.total.max(s.layers.iter().map(|l| l.1).max().unwrap_or(0))
        );
    }
}
