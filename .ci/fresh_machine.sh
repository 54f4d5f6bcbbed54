#!/usr/bin/env bash
# The package as a new user gets it: build the sdist and, from it, the wheel; install the wheel in
# a new virtual environment that has only torch; use it from a directory outside the checkout
# (.ci/smoke.py); then the [bench] extra and a short benchmark that must print its table and write
# JSON, CSV and PNG; then the [examples] extra and the demo, which must train. PREBUILT=1 adds the
# prebuilt extension (FROMAGE_FUSED_BUILD_EXT=1) built with and without build isolation. PYTHON and TORCH pick the interpreter and the torch.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export FROMAGE_FUSED_EXT_DIR=$work/ext  # a first use, as on a new machine
t0=$(date +%s)
stage() { echo "fresh_machine: [$(( $(date +%s) - t0 )) s] $*"; }

stage "building the sdist and the wheel (PEP 517, isolated)"
"$PY" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q build
"$work/tools/bin/python" -m build -q --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/fromage_fused-*.tar.gz)
wheel=$(ls "$work"/dist/fromage_fused-*.whl)
tar -tzf "$sdist" >"$work/sdist.txt"
"$work/tools/bin/python" -m zipfile -l "$wheel" >"$work/wheel.txt"
for f in fromage_cpu.cpp fromage_cuda.cu fromage_common.h; do
    grep -q "/csrc/$f$" "$work/sdist.txt" || { echo "fresh_machine: $f missing from the sdist"; exit 1; }
    grep -q "fromage_fused/csrc/$f " "$work/wheel.txt" || { echo "fresh_machine: $f missing from the wheel"; exit 1; }
done
stage "built $(basename "$sdist") and $(basename "$wheel")"

stage "a new venv with only $TORCH"
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
"${pip[@]}" install -q "$TORCH"
"${pip[@]}" install -q "$wheel"
mkdir "$work/outside"
cd "$work/outside"
stage "smoke test of the wheel (JIT build on first use)"
SMOKE_EXPECT_LOAD=jit-cpu "$work/venv/bin/python" "$root/.ci/smoke.py"
stage "smoke test again (the cached build)"
SMOKE_EXPECT_LOAD=jit-cpu "$work/venv/bin/python" "$root/.ci/smoke.py" >/dev/null

stage "the [bench] extra and fromage-bench --quick --presets resnet50"
"${pip[@]}" install -q "$wheel[bench]"
"$work/venv/bin/fromage-bench" --quick --presets resnet50 --no-progress --out "$work/bench" >"$work/table.txt"
cat "$work/table.txt"
grep -q "^resnet50 " "$work/table.txt" && grep -q "^fromage:cpu " "$work/table.txt" \
    || { echo "fresh_machine: the benchmark table lacks resnet50 or its fromage:cpu row"; exit 1; }
for ext in json csv png; do
    [ -s "$work/bench/bench-cpu-quick.$ext" ] || { echo "fresh_machine: no bench-cpu-quick.$ext written"; exit 1; }
done

stage "the [examples] extra and python -m fromage_fused.demo"
"${pip[@]}" install -q "$wheel[examples]"
"$work/venv/bin/python" -m fromage_fused.demo --epochs 3 --device cpu >"$work/demo.txt"
cat "$work/demo.txt"
grep -q "^epoch   3 .*test accuracy" "$work/demo.txt" || { echo "fresh_machine: the demo did not train"; exit 1; }

if [ "${PREBUILT:-0}" = 1 ]; then
    stage "prebuilt extension, no build isolation (against the torch installed)"
    "${pip[@]}" install -q "setuptools>=77" wheel
    FROMAGE_FUSED_BUILD_EXT=1 "${pip[@]}" install -q --no-build-isolation --no-deps --force-reinstall "$sdist"
    SMOKE_EXPECT_LOAD=prebuilt "$work/venv/bin/python" "$root/.ci/smoke.py" >/dev/null
    stage "prebuilt extension, with build isolation (torch as a build requirement)"
    FROMAGE_FUSED_BUILD_EXT=1 "${pip[@]}" install -q --no-deps --force-reinstall "$sdist"
    SMOKE_EXPECT_LOAD=prebuilt "$work/venv/bin/python" "$root/.ci/smoke.py" >/dev/null
fi
stage "passed"
