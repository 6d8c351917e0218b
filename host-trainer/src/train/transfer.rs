//! Transfer learning: a new run that starts from another run's weights.
//!
//! `--init PATH` (or `default`, the float checkpoint committed with the
//! shipped model) copies every backbone tensor (convolutions, batch-norm
//! weights and running statistics) into the new model; the FC head is new,
//! sized to the new data set's classes. The architectures must match.
//! `--freeze-epochs N` then trains only the head for the first `N` epochs
//! (the backbone's weights stay as loaded; its batch-norm statistics adapt
//! to the new images), after which everything trains.
//!
//! `--keep-head` copies the head too: the run continues the checkpoint's
//! training on the same classes (e.g. a constant-rate phase whose weights
//! are averaged). The head's shape must then match the data set's classes.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::Device;

use crate::checkpoint::{load_checkpoint, saved_tensor};
use crate::train::{TrainConfig, Trainee};

/// Prefix of the FC head's variables.
const HEAD: &str = "fc.";

/// Whether a variable belongs to the FC head.
pub fn is_head(name: &str) -> bool {
    name.starts_with(HEAD)
}

/// Whether `name` is trained in epoch `epoch` (0-based) of `cfg`.
pub fn trains(cfg: &TrainConfig, epoch: usize, name: &str) -> bool {
    epoch >= cfg.freeze_epochs || is_head(name)
}

/// Copies the backbone of the checkpoint at `path` into `t` (whose arch is
/// `cfg.arch`), and its head too with `cfg.keep_head`. Returns the number
/// of tensors copied.
pub fn init_from(t: &Trainee, cfg: &TrainConfig, path: &Path, device: &Device) -> Result<usize> {
    let ck = load_checkpoint(path, device)
        .with_context(|| format!("--init: cannot start from {}", path.display()))?;
    let (a, b) = (&ck.meta.config.arch, &cfg.arch);
    ensure!(
        (&a.widths, &a.blocks, a.maxpool) == (&b.widths, &b.blocks, b.maxpool),
        "--init: {} holds a model with widths {:?}, blocks {:?}, max pool {}; this run's is widths {:?}, \
         blocks {:?}, max pool {} (use the same --arch/--widths/--blocks)",
        path.display(),
        a.widths,
        a.blocks,
        a.maxpool,
        b.widths,
        b.blocks,
        b.maxpool
    );
    // A run with --ema hands on its averaged weights.
    let prefix = ck.weights_prefix();
    let mut copied = 0;
    for (name, var) in t.named_vars() {
        if is_head(&name) && !cfg.keep_head {
            continue;
        }
        let saved = saved_tensor(&ck.tensors, &format!("{prefix}{name}"), var.dims())
            .with_context(|| format!("--init: {}", path.display()))?;
        var.set(saved)?;
        copied += 1;
    }
    Ok(copied)
}
