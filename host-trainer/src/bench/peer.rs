//! The PyTorch peer of `host-trainer bench`: runs `bench/pytorch_bench.py`
//! (the same Mini-ResNet, training step and inference in PyTorch on the CPU)
//! with the same batch size, runs, warm-up and threads, and reads back the
//! JSON line it prints last.
//!
//! PyTorch is a benchmark-only dependency: it lives in `bench/.venv`, made by
//! `bash bench/setup.sh`, and nothing else (no build, no test) needs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
/// The workspace root (the folder holding `bench/`).
pub use workspace_util::workspace_root;

use crate::model::ArchConfig;

/// Which framework `host-trainer bench` compares candle against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// PyTorch on the CPU, through `bench/pytorch_bench.py`.
    Pytorch,
    /// No comparison.
    None,
}

/// Which PyTorch memory formats `host-trainer bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layouts {
    /// Both, each figure compared with the faster.
    Best,
    /// NCHW only (PyTorch's default).
    Nchw,
    /// Channels-last (NHWC) only.
    ChannelsLast,
}

impl Layouts {
    /// The `channels_last` flags to run, in order.
    pub fn channels_last(self) -> &'static [bool] {
        match self {
            Self::Best => &[false, true],
            Self::Nchw => &[false],
            Self::ChannelsLast => &[true],
        }
    }
}

/// What `bench/pytorch_bench.py` reports (its last stdout line).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerResult {
    /// `torch.__version__`.
    pub torch_version: String,
    /// `torch.get_num_threads()` during the run.
    pub threads: usize,
    /// Batch size used.
    pub batch_size: usize,
    /// Timed runs per figure.
    pub runs: usize,
    /// Forward + label-smoothed cross entropy + backward + SGD step, images/s (median).
    pub train_images_per_sec: f64,
    /// Forward in eval mode under `torch.inference_mode()`, images/s (median).
    pub infer_images_per_sec: f64,
}

/// How to run the peer benchmark.
#[derive(Debug, Clone)]
pub struct PeerRun<'a> {
    /// The Python interpreter (normally `bench/.venv/bin/python`).
    pub python: &'a Path,
    /// `bench/pytorch_bench.py`.
    pub script: &'a Path,
    /// The architecture to build (and whose parameter count to check).
    pub arch: &'a ArchConfig,
    /// Batch size.
    pub batch_size: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Timed steps (the median is reported).
    pub runs: usize,
    /// `torch.set_num_threads`.
    pub threads: usize,
    /// NHWC memory format instead of the default NCHW.
    pub channels_last: bool,
}

/// `bench/.venv/bin/python` under the workspace root.
pub fn default_python() -> PathBuf {
    workspace_root().join("bench/.venv/bin/python")
}

/// `bench/pytorch_bench.py` under the workspace root.
pub fn default_script() -> PathBuf {
    workspace_root().join("bench/pytorch_bench.py")
}

/// The one-line hint for setting up the PyTorch environment.
pub const SETUP_HINT: &str =
    "`bash bench/setup.sh` creates bench/.venv with PyTorch from PyPI (4.1 GB)";

/// Reads the result from the script's stdout: the last line that is a JSON
/// object (anything printed before it is ignored).
pub fn parse_output(stdout: &str) -> Result<PeerResult> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "no JSON line in the PyTorch benchmark's output: {:?}",
                tail(stdout, 400)
            )
        })?;
    let r: PeerResult = serde_json::from_str(line)
        .with_context(|| format!("malformed JSON from the PyTorch benchmark: {line}"))?;
    ensure!(
        r.train_images_per_sec.is_finite()
            && r.train_images_per_sec > 0.0
            && r.infer_images_per_sec.is_finite()
            && r.infer_images_per_sec > 0.0,
        "the PyTorch benchmark reported non-positive throughput: {line}"
    );
    Ok(r)
}

/// The last `n` bytes of `s` (at a character boundary).
fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// `--python` as given; a bare name such as `python3` that is not a file in
/// the current folder is looked up on `PATH`, as a shell would.
pub fn resolve_python(p: &Path) -> PathBuf {
    if p.components().count() != 1 || p.exists() {
        return p.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(p))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| p.to_path_buf())
}

/// Fails, naming the path, when the interpreter or the script is missing.
pub fn check_paths(python: &Path, script: &Path) -> Result<()> {
    if !python.exists() {
        bail!(
            "PyTorch peer: no Python at {} ({SETUP_HINT}; or pass --python PATH, or --peer none)",
            python.display()
        );
    }
    if !script.is_file() {
        bail!(
            "PyTorch peer: benchmark script {} not found",
            script.display()
        );
    }
    Ok(())
}

/// Runs the PyTorch benchmark and returns its figures. Blocks until it ends.
pub fn run_pytorch(p: &PeerRun) -> Result<PeerResult> {
    check_paths(p.python, p.script)?;
    let join = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut cmd = Command::new(p.python);
    cmd.arg(p.script)
        .args(["--batch-size", &p.batch_size.to_string()])
        .args(["--runs", &p.runs.to_string()])
        .args(["--warmup", &p.warmup.to_string()])
        .args(["--threads", &p.threads.to_string()])
        .args(["--widths", &join(&p.arch.widths)])
        .args(["--blocks", &join(&p.arch.blocks)])
        .args(["--classes", &p.arch.classes.to_string()])
        .args(["--expect-params", &p.arch.parameters().to_string()])
        .env("OMP_NUM_THREADS", p.threads.to_string())
        .env("MKL_NUM_THREADS", p.threads.to_string());
    if !p.arch.maxpool {
        cmd.arg("--no-maxpool");
    }
    if p.channels_last {
        cmd.arg("--channels-last");
    }
    let out = cmd.output().with_context(|| {
        format!(
            "PyTorch peer: could not run {} {}",
            p.python.display(),
            p.script.display()
        )
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "PyTorch peer: {} {} failed ({}): {}",
            p.python.display(),
            p.script.display(),
            out.status,
            tail(stderr.trim(), 2000)
        );
    }
    parse_output(&stdout).with_context(|| {
        format!(
            "PyTorch peer: {} {}",
            p.python.display(),
            p.script.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"torch_version": "2.15.0+cu132", "threads": 2, "batch_size": 64, "runs": 10, "warmup": 3, "channels_last": false, "parameters": 1334618, "train_images_per_sec": 841.2, "infer_images_per_sec": 2700.0}"#;

    fn run_with<'a>(python: &'a Path, script: &'a Path, arch: &'a ArchConfig) -> PeerRun<'a> {
        PeerRun {
            python,
            script,
            arch,
            batch_size: 8,
            warmup: 1,
            runs: 2,
            threads: 2,
            channels_last: false,
        }
    }

    #[test]
    fn peer_parses_the_last_json_line() {
        let out = format!("some warning\n{{\"not\": \"this\"}}\n{LINE}\n\n");
        let r = parse_output(&out).unwrap();
        assert_eq!(r.torch_version, "2.15.0+cu132");
        assert_eq!((r.threads, r.batch_size, r.runs), (2, 64, 10));
        assert_eq!(r.train_images_per_sec, 841.2);
        assert_eq!(r.infer_images_per_sec, 2700.0);
    }

    #[test]
    fn peer_rejects_malformed_output() {
        let e = parse_output("Traceback: boom\n").unwrap_err();
        assert!(format!("{e:#}").contains("no JSON line"), "{e:#}");
        let e = parse_output("{\"torch_version\": \"2\", \"threads\": 2}\n").unwrap_err();
        assert!(format!("{e:#}").contains("malformed JSON"), "{e:#}");
        let e = parse_output("{not json\n").unwrap_err();
        assert!(format!("{e:#}").contains("malformed JSON"), "{e:#}");
        let zero = LINE.replace("841.2", "0.0");
        let e = parse_output(&zero).unwrap_err();
        assert!(format!("{e:#}").contains("non-positive"), "{e:#}");
    }

    #[test]
    fn peer_missing_python_names_the_path_and_the_setup() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("no-venv/bin/python");
        let arch = ArchConfig::seed();
        let e = run_pytorch(&run_with(&python, &default_script(), &arch)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&python.display().to_string()), "{msg}");
        assert!(msg.contains("bench/setup.sh"), "{msg}");
    }

    #[test]
    fn peer_missing_script_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("gone.py");
        let arch = ArchConfig::seed();
        // Any existing file stands in for the interpreter: it is never run.
        let python = std::env::current_exe().unwrap();
        let e = run_pytorch(&run_with(&python, &script, &arch)).unwrap_err();
        assert!(
            format!("{e:#}").contains(&script.display().to_string()),
            "{e:#}"
        );
    }

    #[test]
    fn peer_default_paths_are_in_the_workspace() {
        assert!(default_script().is_file(), "{}", default_script().display());
    }

    #[test]
    fn bare_python_names_are_looked_up_on_path() {
        let sh = resolve_python(Path::new("sh"));
        assert!(sh.is_absolute() && sh.is_file(), "{}", sh.display());
        let missing = Path::new("no-such-python-3.99");
        assert_eq!(resolve_python(missing), missing);
        let explicit = Path::new("/opt/x/bin/python");
        assert_eq!(resolve_python(explicit), explicit);
        assert!(default_python().ends_with("bench/.venv/bin/python"));
    }

    #[cfg(unix)]
    #[test]
    fn peer_runs_a_stand_in_interpreter_and_reads_its_json() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let arch = ArchConfig::seed();
        let script = default_script();
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        // Records its arguments, prints a line of noise, then the JSON line.
        let args = dir.path().join("args");
        let ok = write(
            "ok-python",
            &format!(
                "#!/bin/sh\necho \"$*\" > '{}'\necho noise\necho '{LINE}'\n",
                args.display()
            ),
        );
        let r = run_pytorch(&run_with(&ok, &script, &arch)).unwrap();
        assert_eq!(r.train_images_per_sec, 841.2);
        let args = std::fs::read_to_string(&args).unwrap();
        for want in [
            "pytorch_bench.py --batch-size 8 --runs 2 --warmup 1 --threads 2",
            "--widths 16,32,64,128 --blocks 3,4,6,3 --classes 10 --expect-params 1334618",
        ] {
            assert!(args.contains(want), "{args}");
        }
        assert!(!args.contains("--no-maxpool"), "{args}");

        let bad = write(
            "bad-python",
            "#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2\nexit 1\n",
        );
        let e = run_pytorch(&run_with(&bad, &script, &arch)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("ModuleNotFoundError") && msg.contains("bad-python"),
            "{msg}"
        );

        let garbage = write("garbage-python", "#!/bin/sh\necho 'hello'\n");
        let e = run_pytorch(&run_with(&garbage, &script, &arch)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("no JSON line") && msg.contains("garbage-python"),
            "{msg}"
        );
    }
}
