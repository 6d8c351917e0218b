#!/usr/bin/env bash
# CI step (`cargo xtask ci` runs it last): the `cuda` feature builds and
# passes clippy on a machine without a GPU or CUDA install, and there
# `--device cuda` is a clear error, not a panic.
#
# scripts/cuda-toolkit.sh installs the CUDA 13.0 compiler and headers from
# PyPI into a cache folder (first run only) and generates link stubs. The
# GPU itself is checked by scripts/gpu-check.sh on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
eval "$(bash scripts/cuda-toolkit.sh)"
cargo build --release --locked -p host-trainer --features cuda
cargo clippy --release --locked -p host-trainer --features cuda --all-targets -- -D warnings

# Run it without a GPU: the stubs stand in for the driver and libraries
# (a real driver on this machine would otherwise be picked up).
rt=$(mktemp -d)
trap 'rm -rf "$rt"' EXIT
for pair in cuda:libcuda.so.1 nvrtc:libnvrtc.so.13 curand:libcurand.so.10 \
  cublas:libcublas.so.13 cublasLt:libcublasLt.so.13; do
  ln -s "$CUDA_HOME/lib/stubs/lib${pair%%:*}.so" "$rt/${pair#*:}"
done
rc=0
out=$(LD_LIBRARY_PATH="$rt:$CUDA_HOME/lib" RUST_BACKTRACE=0 \
  target/release/host-trainer device-check --device cuda 2>&1) || rc=$?
echo "$out"
if [[ $rc -ne 1 ]] || ! grep -q 'cannot open CUDA device 0' <<<"$out" ||
  ! grep -q -- '--device cpu' <<<"$out" || grep -q 'panicked' <<<"$out"; then
  echo "ci-cuda: expected exit 1 with a clear 'cannot open CUDA device 0' error, got exit $rc" >&2
  exit 1
fi
echo "ci-cuda: cuda feature built, linted, and fails cleanly without a GPU ($((SECONDS - t0)) s)"
