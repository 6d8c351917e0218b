#!/usr/bin/env bash
# Runs `host-trainer bench` (candle vs PyTorch) over batch 64 and 128, 1 and 2
# threads, N invocations each (default 3), and prints each run's ratio line
# and per-phase split. `ISA=avx2` holds both frameworks to AVX2+FMA
# (MINI_RESNET_ISA for candle, ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY for
# PyTorch), to measure the AVX2 path on an AVX-512 machine.
#
#   bash bench/setup.sh && cargo build -p host-trainer --release
#   bash bench/matrix.sh            # or: ISA=avx2 N=3 bash bench/matrix.sh
#
# Needs an otherwise idle machine: every other process skews both sides.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${BIN:-$root/target/release/host-trainer}"
n="${N:-3}"
if [ "${ISA:-}" = avx2 ]; then
    export MINI_RESNET_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
fi
lscpu | grep -m1 'Model name' || true
for batch in 64 128; do
    for threads in 2 1; do
        for run in $(seq 1 "$n"); do
            echo "== batch $batch, $threads thread(s), run $run"
            "$bin" bench --batch-size "$batch" --threads "$threads" 2>&1 |
                grep -E '^\| (training step|inference)|fast ops|mean ms'
        done
    done
done
