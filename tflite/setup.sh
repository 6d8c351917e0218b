#!/usr/bin/env bash
# Creates tflite/.venv with TFLite Micro's Python interpreter (pinned in
# tflite/requirements.txt) for `host-trainer tflite-check`, which runs this
# on demand. Nothing else needs it; CI does not.
#
#   bash tflite/setup.sh            # uses python3 (3.10-3.13); PYTHON=python3.11 to choose
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

"$python" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 13), sys.version' || {
    echo "tflite/setup.sh: $python is not Python 3.10-3.13 (set PYTHON=...)" >&2
    exit 1
}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check --no-deps -r "$here/requirements.txt"
"$venv/bin/python" -c 'from tflite_micro import runtime; print("tflite/.venv: tflite_micro runtime", runtime.__name__, "ready")'
