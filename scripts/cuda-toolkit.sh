#!/usr/bin/env bash
# Sets up what `cargo build -p host-trainer --features cuda` needs on a
# machine WITHOUT a GPU or a CUDA install, from PyPI wheels, into a cache
# folder, and prints the environment to build with:
#
#   eval "$(bash scripts/cuda-toolkit.sh)"
#   cargo build --release -p host-trainer --features cuda
#
# What it installs (CUDA 13.0, about 105 MB of wheels, pinned): nvcc, its
# crt headers and NVVM, the runtime (headers, libcudart) and CCCL.
# What it generates: link stubs for the libraries candle's `cuda` feature
# links at build time (libcuda, libnvrtc, libcurand, libcublas, libcublasLt).
# PyPI has no link stub for libcuda, and the real cuBLAS wheel is 423 MB, so
# each stub is a small shared library with the real SONAME that defines every
# function cudarc binds, each returning an error code. They are for linking
# only: at run time the real driver and libraries are loaded by SONAME (on a
# GPU machine, put the CUDA 13 libraries' folder on LD_LIBRARY_PATH).
#
# Why 13.0: cudarc 0.19 (candle 0.11) accepts CUDA 11.4-13.4, the PyPI CUDA
# 12 wheels ship no nvcc, and PTX from 13.0 loads on driver 580 (CUDA 13.0)
# and newer.
#
# Cache: $MINI_RESNET_CUDA_CACHE, default ~/.cache/mini-resnet/cuda-13.0.
# Progress goes to stderr; only `export` lines go to stdout.
set -euo pipefail

cache="${MINI_RESNET_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mini-resnet/cuda-13.0}"
site="$cache/site"
home="$site/nvidia/cu13"
stamp="$cache/.complete-v1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "cuda-toolkit: $*" >&2; }

install_wheels() {
  log "installing the CUDA 13.0 compiler, headers and runtime from PyPI into $site"
  rm -rf "$site"
  mkdir -p "$site"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --target "$site" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
  test -x "$home/bin/nvcc" || { log "no nvcc at $home/bin/nvcc after install"; exit 1; }
  # candle-kernels links `-lcudart`: the wheel has only the versioned name.
  ln -sf libcudart.so.13 "$home/lib/libcudart.so"
}

# The cudarc source in cargo's registry (fetched if needed).
cudarc_src() {
  local version
  version=$(cd "$root" && cargo metadata --format-version 1 --locked \
    --features cuda --manifest-path host-trainer/Cargo.toml 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
  dirname "$version"
}

# stub <soname> <link name> <error code> <sys module folders...>
stub() {
  local soname=$1 link=$2 code=$3
  shift 3
  local c="$cache/stubs/$link.c"
  {
    echo "/* link stub for $soname: every function returns $code */"
    for d in "$@"; do
      grep -hoE '^ {12}fn [A-Za-z_][A-Za-z0-9_]*\(' "$d/sys/mod.rs" | sed -E 's/^ +fn ([A-Za-z0-9_]+)\(/\1/'
    done | sort -u | sed -E "s/.*/int &(void) { return $code; }/"
  } >"$c"
  cc -shared -fPIC -o "$home/lib/stubs/lib$link.so" -Wl,-soname,"$soname" "$c"
}

make_stubs() {
  local src
  src=$(cudarc_src)
  log "generating link stubs from $src"
  mkdir -p "$cache/stubs" "$home/lib/stubs"
  stub libcuda.so.1 cuda 34 "$src/src/driver"          # CUDA_ERROR_STUB_LIBRARY
  stub libnvrtc.so.13 nvrtc 7 "$src/src/nvrtc"         # NVRTC_ERROR_BUILTIN_OPERATION_FAILURE
  stub libcurand.so.10 curand 203 "$src/src/curand"    # CURAND_STATUS_INITIALIZATION_FAILED
  stub libcublas.so.13 cublas 1 "$src/src/cublas"      # CUBLAS_STATUS_NOT_INITIALIZED
  stub libcublasLt.so.13 cublasLt 1 "$src/src/cublaslt"
}

if [[ ! -f "$stamp" ]]; then
  install_wheels
  make_stubs
  touch "$stamp"
else
  log "using $cache"
fi

cat <<ENV
export CUDA_HOME="$home"
export CUDA_PATH="$home"
export PATH="$home/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$home/lib:$home/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
ENV
