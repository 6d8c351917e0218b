//! Fast CPU training ops for candle, as custom ops with their own backward
//! passes. candle's autograd stays the framework: these are nodes in its
//! graph like any other op.
//!
//! All activations are **NHWC** f32 on the CPU (channels innermost, so every
//! per-channel operation is a vector operation and a 1x1 convolution is a
//! plain matrix product); weights keep candle's OIHW layout.
//!
//! * [`conv_bn_train`]: conv + BatchNorm (batch statistics) + optional ReLU
//!   as one op, with no im2col matrix (see `conv.rs`); the products run on
//!   one register-blocked kernel with runtime ISA dispatch (`kernel.rs`:
//!   AVX-512F, AVX2+FMA or portable).
//! * [`block_train`]: a whole residual block in training mode as one op,
//!   its backward pass inside (`block.rs`); the conv backward pass itself is
//!   in `backward.rs`.
//! * [`conv_affine_eval`]: the inference twin, with the running statistics
//!   folded into the weights and a shift; [`conv_affine_add_relu_eval`] ends
//!   a residual block with the add and ReLU in the conv's epilogue.
//! * [`add_relu`]: the residual `relu(a + b)` with a one-pass backward.
//! * [`maxpool_3x3_s2_p1`]: max pool with padding and a backward pass.
//!
//! Work is split over rayon's pool (`RAYON_NUM_THREADS`, default one thread
//! per core) by chunks of images that depend only on the shape, and partial
//! sums are combined in chunk order: the results do not depend on the
//! thread count. Every op is checked against the stock candle op and by
//! finite differences in `tests.rs`; `profile` times the phases for
//! `host-trainer bench`.

mod backward;
mod block;
mod conv;
pub mod kernel;
mod pool;
pub mod profile;
#[cfg(test)]
mod tests;

pub use block::{block_train, BlockSpec};
pub use conv::{
    conv_affine_add_relu_eval, conv_affine_eval, conv_affine_relu_maxpool_eval, conv_bn_train,
    BnStats,
};
pub use kernel::Isa;
pub use pool::maxpool_3x3_s2_p1;
use profile::Phase;

use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp2, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

// ---------------------------------------------------------------------------
// Threads

/// Sets up threads for CPU training; call once at start-up, before any
/// candle op. Returns the worker count.
///
/// The custom ops run on rayon's global pool with `threads` workers
/// (default: `$RAYON_NUM_THREADS`, else one per core). candle's own
/// elementwise pool (sized from `$RAYON_NUM_THREADS` too) is kept to the
/// calling thread: its main thread spins while it waits for its workers,
/// which on a 2-core machine fights the rayon workers for the cores (17%
/// of a step measured). Only the small ops (loss, FC, optimizer, gradient
/// sums) still run through candle's pool.
pub fn configure_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    let n = threads
        .or_else(|| std::env::var("RAYON_NUM_THREADS").ok()?.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    keep_freed_memory();
    // Must happen before candle reads it; nothing else runs yet.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    if rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_err()
    {
        // Already built (e.g. called twice): keep what exists.
        return Ok(rayon::current_num_threads());
    }
    Ok(n)
}

/// Runs `f` on a worker of the ops' thread pool and returns its result.
///
/// A parallel section started from a thread outside the pool puts that
/// thread to sleep until the workers finish, and the workers sleep between
/// sections: two wake-ups per section, each a costly inter-processor
/// interrupt on a virtual machine. Run from a worker, the caller takes its
/// share of the work and only the other workers are woken. Call it once
/// around the whole job (training, evaluation, benchmark).
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Keeps freed blocks in the process instead of returning them to the
/// system (glibc's default for blocks of 128 KiB and more): a training step
/// allocates and frees tens of MB of activations, and fresh pages cost a
/// page fault and a kernel zero-fill each, every step.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before the
    // worker threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // One arena: blocks freed by one worker thread are reused by all
        // (per-thread arenas give their free pages back to the system).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

// ---------------------------------------------------------------------------
// Raw access helpers

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expects f32 tensors")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: expects contiguous tensors"),
    }
}

/// Runs `f` on the f32 data of a CPU tensor (made contiguous first).
fn read<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => f(slice(s, l, op)?),
        _ => bail!("{op}: CPU tensors only"),
    }
}

fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A zeroed `f32` buffer whose first element sits on a 64-byte boundary,
/// so that vector rows of the product kernel's `B` operand never straddle
/// two cache lines (measured: up to 40% of the kernel's speed).
#[derive(Debug)]
struct Aligned {
    v: Vec<f32>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn zeros(len: usize) -> Self {
        Self::at_line(vec![0f32; len + 16], len)
    }

    /// Like [`output_vec`]: the caller writes all `len` elements before
    /// reading any.
    fn uninit(len: usize) -> Self {
        Self::at_line(output_vec(len + 16), len)
    }

    fn at_line(v: Vec<f32>, len: usize) -> Self {
        let off = v.as_ptr().align_offset(64).min(16);
        Self { v, off, len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// A vector of `len` floats for an op's output that the op writes
/// completely before anything reads it: it skips the zero-fill that
/// `vec![0.0; len]` would spend on data about to be overwritten (a pass
/// over every activation, 5% of an inference batch measured).
///
/// Callers name the code that writes every element.
fn output_vec(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every caller overwrites
    // all `len` elements (through raw pointers or `&mut` slices) before the
    // vector is read or handed to candle.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// A pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: every use below writes disjoint index sets from different threads
// and the pointee outlives the parallel section.
unsafe impl Send for SyncPtr {}
// SAFETY: as `Send`: threads share the pointer only to write disjoint
// elements.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

// ---------------------------------------------------------------------------
// Residual add + ReLU

#[derive(Debug, Clone, Copy)]
struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "fast-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "add_relu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            )
        }
        let t0 = Instant::now();
        let (a, b) = (slice(s1, l1, "add_relu")?, slice(s2, l2, "add_relu")?);
        // Every element is written below.
        let mut y = output_vec(a.len());
        y.par_chunks_mut(4096)
            .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
            .for_each(|(d, (a, b))| {
                for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                    *d = (a + b).max(0.0);
                }
            });
        profile::add(Phase::Elementwise, t0);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let t0 = Instant::now();
        let g = read(y, "add_relu backward", |y| {
            read(dy, "add_relu backward", |dy| Ok(relu_backward(y, dy)))
        })?;
        let g = tensor(g, y.shape())?;
        profile::add(Phase::Elementwise, t0);
        Ok((Some(g.clone()), Some(g)))
    }
}

/// The gradient through a ReLU whose output was `y`: `dy` where `y > 0`.
fn relu_backward(y: &[f32], dy: &[f32]) -> Vec<f32> {
    // Every element is written below.
    let mut g = output_vec(y.len());
    g.par_chunks_mut(4096)
        .zip(y.par_chunks(4096).zip(dy.par_chunks(4096)))
        .for_each(|(g, (y, dy))| {
            for ((g, &y), &d) in g.iter_mut().zip(y).zip(dy) {
                *g = if y > 0.0 { d } else { 0.0 };
            }
        });
    g
}

/// `relu(a + b)` for two tensors of the same shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}
