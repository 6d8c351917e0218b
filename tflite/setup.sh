#!/usr/bin/env bash
# Creates tflite/.venv with TFLite Micro's Python interpreter (pinned in
# tflite/requirements.txt) for `host-trainer tflite-check`, which runs this
# on demand. Nothing else needs it; CI does not.
#
#   bash tflite/setup.sh            # uses python3 (3.10-3.13); PYTHON=python3.11 to choose
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../scripts/venv.sh
source "$here/../scripts/venv.sh"
py="$(make_venv "$here" 10 13)"
"$py" -c 'from tflite_micro import runtime; print("tflite/.venv: tflite_micro runtime", runtime.__name__, "ready")'
