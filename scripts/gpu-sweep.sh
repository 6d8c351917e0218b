#!/usr/bin/env bash
# Continuation runs from the shipped checkpoint, side by side on one GPU
# (the sweep of docs/gpu.md, "Continuation phase"). Like gpu-check.sh, for a
# GPU machine with no Rust toolchain and no network: `bash
# scripts/gpu-check.sh pack` here, then this script there, in the
# repository root, with .gpu/ copied along.
#
# Five runs of `train --init <shipped checkpoint> --keep-head --batch-size
# 512` start together and each stops after $LIMIT seconds (420); each
# checkpoints every epoch, so a run stopped there can go on with the same
# command plus --resume. Under $OUT (default /tmp/gpu-sweep-out): each
# run's averaged weights as a weights-only checkpoint (`<name>.safetensors`,
# for eval/export), logs.tgz (logs, metrics.csv) and the GPU load.
#
# For a trial on the CPU: HT=<host-trainer binary> DATA=<CIFAR-10 folders>
# DEV=cpu LIMIT=60 EXTRA="--train-limit 1024 --test-limit 500".
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIMIT=${LIMIT:-420}
OUT="${OUT:-/tmp/gpu-sweep-out}"
work=/tmp/gpu-sweep
[[ -d /dev/shm && -w /dev/shm ]] && work=/dev/shm/gpu-sweep
rm -rf "$work" && mkdir -p "$work/data" "$OUT"
if [[ -n "${HT:-}" ]]; then
  cp "$HT" "$work/ht"
else
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
    "$root/.gpu/host-trainer.xz" "$work/ht" && chmod +x "$work/ht"
fi
if [[ -n "${DATA:-}" ]]; then
  ln -s "$DATA"/* "$work/data/"
else
  tar -C "$work/data" -xzf "$root/.gpu/cifar10-jpeg.tar.gz"
fi
libs=$(python3 - <<'PY'
import glob, site, sys
for r in site.getsitepackages() + sys.path:
    for d in glob.glob(f"{r}/nvidia/cu13/lib") + glob.glob(f"{r}/nvidia/cublas/lib"):
        if glob.glob(f"{d}/libcublas.so.13*"):
            print(d); raise SystemExit
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
ck="$root/shared/src/model/generated/checkpoint.safetensors"
# EXTRA is split into words on purpose (several options).
# shellcheck disable=SC2206
common=(${EXTRA:-} --device "${DEV:-cuda}" --data "$work/data" --init "$ck" --keep-head
  --batch-size 512 --export none --quiet)
pids=()
launch() {
  local name=$1
  shift
  (
    timeout -k 5 "$LIMIT" "$work/ht" train "${common[@]}" --run-dir "$work/$name" "$@" \
      >"$work/$name.log" 2>&1
    echo "exit $? after $SECONDS s" >>"$work/$name.log"
  ) &
  pids+=($!)
}
nvidia-smi --query-gpu=utilization.gpu,memory.used,clocks.sm --format=csv -l 20 \
  >"$work/smi.log" 2>&1 &
smi=$!
launch A --decay constant --lr 0.04 --augment crop-flip --swa-from 1 --epochs 60
launch B --decay constant --lr 0.04 --augment camera --swa-from 1 --epochs 60
launch C --decay constant --lr 0.01 --augment crop-flip --swa-from 1 --epochs 60
launch D --decay linear --lr 0.04 --augment crop-flip --no-average --epochs 12
launch E --decay constant --lr 0.01 --augment camera --swa-from 1 --epochs 60
wait "${pids[@]}"
kill "$smi" 2>/dev/null
for r in A B C D E; do
  echo "== $r"
  grep -E '^epoch|^exit|rror|^init' "$work/$r.log" | tail -70
  # `average` of a checkpoint with itself: its (averaged) weights alone.
  [[ -f "$work/$r/checkpoint.safetensors" ]] &&
    timeout 60 "$work/ht" average --out "$OUT/$r.safetensors" \
      "$work/$r/checkpoint.safetensors" "$work/$r/checkpoint.safetensors" | tail -1
done
cat "$work/smi.log"
tar -C "$work" -czf "$OUT/logs.tgz" $(cd "$work" && ls ./*.log ./*/metrics.csv 2>/dev/null)
