#!/usr/bin/env bash
# make test-pythons: the agent's tests in a venv of each other Python a device runs,
# with that device's extras and constraints and no TensorFlow or tflite-runtime:
#   3.10 (Jetson, JetPack 6): constraints/jetpack6.txt, numpy 2.2
#   3.13 (Raspberry Pi OS Trixie): constraints/trixie.txt, numpy 2
# Interpreters are found, never downloaded: $PYTHON310 / $PYTHON313, python3.X on PATH,
# or pyenv's ~/.pyenv/versions/3.X.*. A Python the machine lacks is skipped, said loudly,
# and the script then exits 77 (after running the others). Models the tests would build
# with TensorFlow come from $EDGE_TEST_MODELS, which `make test-pythons` fills first from
# the main venv (tests/prebuilt_models.py). Venvs: .venv-py3XX, rebuilt when pyproject.toml
# or the constraints file changes. Extra pytest arguments: TEST_PYTHONS_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."

: "${EDGE_TEST_MODELS:?EDGE_TEST_MODELS must name the prebuilt models (make test-pythons sets it)}"
EXTRAS=litert,camera,metrics,audio
TEST_DEPS="pytest>=8 pytest-timeout>=2.2 hypothesis>=6 jinja2>=3.1 tomli>=2;python_version<'3.11'"
# What needs TensorFlow or tflite-runtime (the converter's own tests, those runtimes):
# left out here, run by `make test` in the main venv.
LEFT_OUT=(-m "not workstation"
          --ignore=tests/test_converter_cli.py --ignore=tests/test_converter_convert.py
          --ignore=tests/server)

find_python() {
    # The first candidate that runs and is that version (pyenv's shims exist for
    # versions that are installed but not selected, and then fail).
    local ver=$1 var="PYTHON${1/./}" candidate
    for candidate in ${!var:-} "$(command -v "python$ver")" \
        $(ls -d "$HOME"/.pyenv/versions/"$ver".*/bin/python 2>/dev/null | sort -rV); do
        if [ -n "$candidate" ] && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$ver" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

make_venv() {
    local py=$1 venv=$2 constraints=$3 key
    key=$( (cat pyproject.toml "$constraints"; echo "$EXTRAS $TEST_DEPS") | sha256sum | cut -c1-16)
    if [ -f "$venv/.installed-$key" ]; then return 0; fi
    rm -rf "$venv"
    "$py" -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install -q --upgrade pip || return 1
    "$venv/bin/python" -m pip install -q -c "$constraints" -e ".[$EXTRAS]" $TEST_DEPS || return 1
    "$venv/bin/python" -m pip check || return 1
    # The device venv must really be one: no TensorFlow, no tflite-runtime.
    "$venv/bin/python" - <<'PY' || return 1
import importlib.util, sys
extra = [m for m in ("tensorflow", "tflite_runtime") if importlib.util.find_spec(m)]
sys.exit(f"not a device venv: {extra} installed" if extra else 0)
PY
    touch "$venv/.installed-$key"
}

status=0
skipped=()
for target in "3.10 jetpack6" "3.13 trixie"; do
    set -- $target
    ver=$1 constraints=constraints/$2.txt venv=.venv-py${1/./}
    if ! py=$(find_python "$ver"); then
        echo "test-pythons: SKIPPED Python $ver: no interpreter found (set PYTHON${ver/./})" >&2
        skipped+=("$ver")
        continue
    fi
    echo "== test-pythons: Python $ver ($py), $constraints, $venv"
    start=$SECONDS
    if ! make_venv "$py" "$venv" "$constraints"; then
        echo "test-pythons: Python $ver: FAILED to install the venv" >&2
        status=1
        continue
    fi
    echo "venv ready in $((SECONDS - start)) s: $("$venv/bin/python" -c 'import numpy, ai_edge_litert, cv2, sys; print(sys.version.split()[0], "numpy", numpy.__version__, "opencv", cv2.__version__)')"
    start=$SECONDS
    EDGE_TEST_MODELS=$EDGE_TEST_MODELS EDGE_TEST_DEVICE_VENV=1 \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider "${LEFT_OUT[@]}" ${TEST_PYTHONS_ARGS:-} \
        || { echo "test-pythons: Python $ver: tests FAILED" >&2; status=1; }
    echo "tests on Python $ver in $((SECONDS - start)) s"
done
if [ "$status" -ne 0 ]; then exit "$status"; fi
if [ "${#skipped[@]}" -gt 0 ]; then
    echo "test-pythons: skipped Python ${skipped[*]} (not on this machine): not a pass" >&2
    exit 77
fi
echo "test-pythons: passed"
