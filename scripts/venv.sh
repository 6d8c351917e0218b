# Sourced by bench/setup.sh and tflite/setup.sh: `make_venv DIR MIN MAX`
# makes DIR/.venv with $PYTHON (default python3), which must be Python
# MIN..MAX (minor versions of 3), and installs DIR/requirements.txt into it
# (pinned, no dependency resolution). Prints the venv's python on stdout.
make_venv() {
    local dir="$1" min="$2" max="$3"
    local python="${PYTHON:-python3}" name
    name="$(basename "$dir")"
    "$python" -c "import sys; assert (3, $min) <= sys.version_info[:2] <= (3, $max), sys.version" || {
        echo "$name/setup.sh: $python is not Python 3.$min-3.$max (set PYTHON=...)" >&2
        return 1
    }
    if [ ! -x "$dir/.venv/bin/python" ]; then
        "$python" -m venv "$dir/.venv" >&2
    fi
    "$dir/.venv/bin/python" -m pip install --disable-pip-version-check --no-deps \
        -r "$dir/requirements.txt" >&2
    echo "$dir/.venv/bin/python"
}
