#!/usr/bin/env bash
# GPU check: CPU-vs-CUDA agreement, step benchmark against PyTorch on the
# same GPU, and a timed 5-epoch training run, on a machine with an NVIDIA
# GPU but no Rust toolchain and no network (the H200 machines lent to this
# project: CUDA 13 driver, python3 with PyTorch and the NVIDIA CUDA 13
# libraries in its site-packages).
#
#   bash scripts/gpu-check.sh pack   # here: build, pack binary + data into .gpu/
#   bash scripts/gpu-check.sh run    # there, in the repository root, with .gpu/
#
# `pack` builds `host-trainer --features cuda` (scripts/cuda-toolkit.sh sets
# up the compiler), strips and xz-compresses it (about 9 MB), and packs the
# CIFAR-10 JPEG folders into a .tar.gz (the 60,000 small JPEGs share their
# tables, so gzip takes 56 MB of files to about 20 MB; the GPU machine
# accepts 64 MiB with the repository). Data: $MINI_RESNET_DATA, default
# ../shared/data/cifar10-jpeg.
#
# `run` writes gpu-check.log (every stage's output), metrics.csv,
# learning_curve.svg and the final checkpoint under $OUT
# (default /tmp/gpu-check-out) and prints a summary last. Each stage has its
# own time limit and a failing stage does not stop the later ones; the exit
# status is that of the agreement check.
#   GPU_CHECK_EPOCHS (5), GPU_CHECK_BATCH (128), GPU_CHECK_LR (recipe's),
#   GPU_CHECK_BENCH (batch sizes to benchmark, "128 512"; empty: none),
#   GPU_CHECK_DEADLINE_S (480: no stage starts or runs past it; when
#   benchmarks are on, training leaves the last 100 s of it to those after
#   it, batch sizes other than 128).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pack_dir="$root/.gpu"

pack() {
  set -e
  local data="${MINI_RESNET_DATA:-$root/../shared/data/cifar10-jpeg}"
  [[ -d "$data/train" && -d "$data/test" ]] || {
    echo "gpu-check: no CIFAR-10 image folders at $data (set MINI_RESNET_DATA)" >&2
    exit 1
  }
  eval "$(bash "$root/scripts/cuda-toolkit.sh")"
  (cd "$root" && CARGO_TARGET_DIR="$root/target/cuda" \
    cargo build --release --locked -p host-trainer --features cuda)
  mkdir -p "$pack_dir"
  local bin="$root/target/cuda/release/host-trainer"
  strip --strip-all -o "$pack_dir/host-trainer" "$bin"
  xz -T0 -9 -f "$pack_dir/host-trainer"
  tar -C "$data" -czf "$pack_dir/cifar10-jpeg.tar.gz" train test
  du -sh "$pack_dir"/*
  echo "gpu-check: packed; carry .gpu to the GPU machine and run: bash scripts/gpu-check.sh run"
}

# The folder holding the CUDA 13 libraries of python3's NVIDIA wheels.
cuda_libs() {
  python3 - <<'PY'
import glob, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for r in roots:
    for d in glob.glob(f"{r}/nvidia/cu13/lib") + glob.glob(f"{r}/nvidia/cublas/lib"):
        if glob.glob(f"{d}/libcublas.so.13*"):
            print(d)
            raise SystemExit
PY
}

stage() { # stage <name> <seconds> <command...>: runs with a limit, logs to $logs/<name>.log and $OUT/gpu-check.log
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "== $name: skipped, the run's ${GPU_CHECK_DEADLINE_S:-480} s are spent" | tee "$logs/$name.log"
    return 124
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  { echo "== $name: $*"; cat "$logs/$name.log"; echo "== $name: exit $rc"; } >>"$OUT/gpu-check.log"
  return "$rc"
}

bench() { # bench <batch>: candle, then PyTorch NCHW and channels-last, on the GPU
  local b=$1
  stage "bench-candle-b$b" 45 "$bin" bench --device cuda --batch-size "$b" \
    --runs 20 --warmup 5 --peer none --json
  stage "bench-pytorch-b$b" 45 python3 "$root/bench/pytorch_bench.py" --device cuda \
    --batch-size "$b" --runs 20 --warmup 5
  stage "bench-pytorch-cl-b$b" 45 python3 "$root/bench/pytorch_bench.py" --device cuda \
    --channels-last --batch-size "$b" --runs 20 --warmup 5
}

run() {
  deadline=$((SECONDS + ${GPU_CHECK_DEADLINE_S:-480}))
  OUT="${OUT:-/tmp/gpu-check-out}"
  mkdir -p "$OUT"
  local work=/tmp/gpu-check
  [[ -d /dev/shm && -w /dev/shm ]] && work=/dev/shm/gpu-check # 60,000 small files
  logs=$work/logs
  rm -rf "$work" && mkdir -p "$work/data" "$logs"
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
    "$pack_dir/host-trainer.xz" "$work/host-trainer" && chmod +x "$work/host-trainer"
  tar -C "$work/data" -xzf "$pack_dir/cifar10-jpeg.tar.gz"
  local libs
  libs=$(cuda_libs)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nproc
  echo "CUDA libraries: ${libs:-NOT FOUND}"
  ldd "$work/host-trainer" | grep -E 'cuda|nvrtc|curand|cublas|not found'
  bin="$work/host-trainer"
  local data="$work/data"
  local epochs="${GPU_CHECK_EPOCHS:-5}" batch="${GPU_CHECK_BATCH:-128}"
  local lr_arg=()
  [[ -n "${GPU_CHECK_LR:-}" ]] && lr_arg=(--lr "$GPU_CHECK_LR")

  local benches="${GPU_CHECK_BENCH-128 512}" reserve=0
  [[ -n "$benches" ]] && reserve=100
  stage agreement 90 "$bin" device-check --device cuda --data "$data"
  local agree=$?
  for b in $benches; do [[ $b == 128 ]] && bench 128; done
  stage train $((deadline - SECONDS - reserve)) "$bin" train --device cuda --data "$data" \
    --epochs "$epochs" --batch-size "$batch" "${lr_arg[@]}" --export none \
    --run-dir "$work/run" --quiet
  for b in $benches; do [[ $b != 128 ]] && bench "$b"; done
  cp "$work/run/metrics.csv" "$work/run/checkpoint.safetensors" "$work/run/learning_curve.svg" "$OUT/" 2>/dev/null

  echo
  echo "================ summary ================"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  grep -vE '^ +[0-9]+: |^Stack backtrace|^$' "$logs/agreement.log" | head -16
  for b in $benches; do
    echo "batch $b candle: $(grep -hoE '"(train|infer)_images_per_sec": [0-9.]+' "$logs/bench-candle-b$b.log" | tr '\n' ' ')"
    echo "batch $b $(grep -h '^pytorch' "$logs/bench-pytorch-b$b.log")"
    echo "batch $b channels-last $(grep -h '^pytorch' "$logs/bench-pytorch-cl-b$b.log")"
  done
  grep -hE '^epoch|^test accuracy|^wall|Error|error' "$logs/train.log" | tail -40
  return "$agree"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *)
    echo "usage: bash scripts/gpu-check.sh pack|run" >&2
    exit 2
    ;;
esac
