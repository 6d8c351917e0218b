#!/usr/bin/env bash
# Creates bench/.venv with the pinned PyTorch of bench/requirements.txt, for
# `host-trainer bench --peer pytorch`. Benchmark only: nothing else needs it.
#
#   bash bench/setup.sh             # uses python3 (3.10-3.14); PYTHON=python3.11 to choose
#
# Everything comes from PyPI (2.4 GB of wheels, 4.1 GB installed, about a minute):
# the Linux torch wheel there is the CUDA build and libtorch cannot load
# without the CUDA runtime libraries, so requirements.txt lists them; it
# still runs on the CPU without a GPU or driver.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

"$python" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 14), sys.version' || {
    echo "bench/setup.sh: $python is not Python 3.10-3.14 (set PYTHON=...)" >&2
    exit 1
}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check --no-deps -r "$here/requirements.txt"
"$venv/bin/python" - <<'PY'
import torch
x = torch.randn(8, 8)
assert torch.allclose(x @ torch.eye(8), x)
print(f"bench/.venv: torch {torch.__version__} on the CPU "
      f"(CUDA available: {torch.cuda.is_available()}), {torch.get_num_threads()} threads")
PY
du -sh "$venv"
