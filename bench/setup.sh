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
# shellcheck source=../scripts/venv.sh
source "$here/../scripts/venv.sh"
py="$(make_venv "$here" 10 14)"
"$py" - <<'PY'
import torch
x = torch.randn(8, 8)
assert torch.allclose(x @ torch.eye(8), x)
print(f"bench/.venv: torch {torch.__version__} on the CPU "
      f"(CUDA available: {torch.cuda.is_available()}), {torch.get_num_threads()} threads")
PY
du -sh "$here/.venv"
