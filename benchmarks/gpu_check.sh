#!/usr/bin/env bash
# Everything a machine with a GPU checks, in one call: offline install, build of the native
# extension (and the nvcc spill check), the gpu-marked tests, and the benchmark on the GPU presets.
#
#   OUT=/dir/for/results bash benchmarks/gpu_check.sh
#   GPU_CHECK_REHEARSAL=1 OUT=/tmp/rehearsal bash benchmarks/gpu_check.sh   # the same on CPU, short
#
# $OUT receives at most 7 files, flat: summary.txt (written first and rewritten after every
# stage, so a run cut off anywhere still says what it learned; it names the modules the run needs
# that do not import here), setup.log (install, build, nvcc check), tests.log, bench.log and the
# benchmark's NAME.json/.csv/.png with NAME = gpu-<device>-<YYYYMMDD>. The benchmark rows are also copied into $RESULTS_DIR (default
# benchmarks/results; $OUT/results in a rehearsal), rows carrying device, versions and date.
#
# Time: the stages share GPU_CHECK_BUDGET seconds (default 480: one call of 8 minutes, which leaves
# a 15-minute device session room for the machine's start and a shorter rerun). Each stage runs
# under `timeout -s INT` (pytest prints its failures and summary on SIGINT, not on SIGTERM) with
# LIMIT_<STAGE> seconds at most: install 30, build 150, nvcc 60, tests 240 (LIMIT_TEST=90 per
# test), and the benchmark gets what is left (its rows are saved as they finish): the presets and
# contenders that decide the goals run first, so a run cut off there still decides them. A test
# module that cannot be collected (a missing dependency) fails alone; the others run. STAGES="tests
# bench" runs a subset (a rerun of what failed); PYTEST_ARGS adds pytest arguments (e.g. -k name).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

# -- functions (GPU_CHECK_LIB=1 stops after defining them, for tests) -----------------------------

clear_build_locks() {  # torch's FileBaton waits for ever on a lock a killed build left behind
    local dir=$1
    [ -d "$dir" ] || return 0
    find "$dir" -name lock -type f -print -delete 2>/dev/null | sed 's/^/removed stale build lock: /'
}

# Every third-party module the package, its tests and the benchmark import (tests/test_gpu_check.py
# keeps the list whole), with what needs it.
NEEDED_MODULES="torch:everything numpy:tests pytest:tests hypothesis:tests triton:the-triton-backend \
ninja:the-extension-build tqdm:the-benchmark matplotlib:the-benchmark-plot sklearn:the-examples-tests scipy:the-examples-tests"
# Imported only where present (a contender or a test that is skipped without them): not checked.
OPTIONAL_MODULES="apex:the-apex-FusedLAMB-contender torchvision:timm-in-the-integration-tests"

missing_modules() {  # missing_modules PYTHON: "name (for what; error)" per module that does not import
    "$1" - $NEEDED_MODULES 2>/dev/null <<'EOF'
import importlib, sys
missing = []
for item in sys.argv[1:]:
    name, _, why = item.partition(":")
    try:
        importlib.import_module(name)
    except Exception as exc:  # absent, or broken on import
        missing.append(f"{name} (for {why.replace('-', ' ')}; {type(exc).__name__})")
print("; ".join(missing) if missing else "none")
EOF
}

slug() {  # "NVIDIA H200 NVL" -> "h200-nvl"
    printf '%s' "$1" | tr 'A-Z' 'a-z' | sed -E 's/nvidia|geforce|tesla//g; s/[^a-z0-9]+/-/g; s/^-+|-+$//g'
}

if [ -n "${GPU_CHECK_LIB:-}" ]; then
    return 0 2>/dev/null || exit 0
fi

: "${OUT:?set OUT to the directory for logs and results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
echo "gpu_check started $(date -u +%Y-%m-%dT%H:%M:%SZ); nothing has run yet" >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1
export COLUMNS=${COLUMNS:-240}  # pytest cuts its FAILED lines to the terminal's width

if [ -n "${GPU_CHECK_REHEARSAL:-}" ]; then
    MODE=rehearsal
    DEVICE=cpu
    if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
    BUDGET=${GPU_CHECK_BUDGET:-240}
    DEF_INSTALL=60; DEF_BUILD=150; DEF_TESTS=90; DEF_TEST_EACH=60
    RESULTS_DIR=${RESULTS_DIR:-$OUT/results}
    BENCH_ARGS=(--presets resnet50 --contenders 'fromage:cpu,loop,torch:adamw' --repeats 3 --warmup 1 --threads 1)
else
    MODE=gpu
    DEVICE=${BENCH_DEVICE:-cuda}
    BUDGET=${GPU_CHECK_BUDGET:-480}
    DEF_INSTALL=30; DEF_BUILD=150; DEF_TESTS=240; DEF_TEST_EACH=90
    RESULTS_DIR=${RESULTS_DIR:-$ROOT/benchmarks/results}
    # The presets of the goals first (a limit cuts the last rows), the contenders they compare.
    # Presets in the order of the goals they decide (benchmarks/gpu_goals.py: copy bandwidth and
    # AdamW on gpt2-small and larger, the loop on gpt2-small and many-small, Triton on every one),
    # contenders in the order given (those the goals compare first): a limit cuts the last rows.
    BENCH_ARGS=(--presets gpt2-small,many-small,gpt2-medium,decoder-1b,few-huge,vit-b16,resnet50
                --contenders 'fromage:cuda,torch:adamw,loop,fromage:triton,fromage:foreach,torch:sgd')
fi
PY=${PYTHON:-python3}
STAGES=${STAGES:-install build tests bench}
if [ -n "${SKIP_INSTALL:-}" ]; then STAGES=${STAGES//install/}; fi
# A build cache of its own, so that a stale lock here is ours to remove.
export FROMAGE_FUSED_EXT_DIR=${FROMAGE_FUSED_EXT_DIR:-/tmp/fromage_fused_gpu_check_ext}
# A failed extension build fails the tests instead of falling back to another backend.
export FROMAGE_FUSED_REQUIRE_EXT=1

GPU_LINE=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
if [ "$MODE" = gpu ] && [ -n "$GPU_LINE" ]; then
    GPU_NAME=${GPU_LINE%%,*}
    CAP=$(printf '%s' "$GPU_LINE" | awk -F', *' '{print $4}')
    # Build the kernels for this device only (torch otherwise builds for every arch it knows).
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$CAP" ]; then export TORCH_CUDA_ARCH_LIST=$CAP; fi
else
    GPU_NAME=$([ "$MODE" = gpu ] && echo "unknown-gpu" || echo "cpu")
fi
NAME=gpu-$(slug "$GPU_NAME")-$(date -u +%Y%m%d)
[ "$MODE" = rehearsal ] && NAME=rehearsal-$(date -u +%Y%m%d)
VERSIONS=$("$PY" - 2>/dev/null <<'EOF'
import platform
parts = ["python " + platform.python_version()]
try:
    import torch
    parts.append(f"torch {torch.__version__} (cuda {torch.version.cuda})")
except Exception as exc:
    parts.append(f"torch unavailable ({exc.__class__.__name__})")
try:
    import triton
    parts.append(f"triton {triton.__version__}")
except Exception:
    parts.append("triton absent")
print(", ".join(parts))
EOF
)
NVCC_VERSION=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
MISSING=$(missing_modules "$PY")

: >"$WORK/stages"
: >"$WORK/notes"
echo "summary written first; no stage has run yet" >"$WORK/failures"
: >"$WORK/goals"

write_summary() {  # write_summary CURRENT: rewrite $OUT/summary.txt from what is known now
    {
        echo "gpu_check $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s of a ${BUDGET} s budget; $1"
        echo "device:   ${GPU_LINE:-$GPU_NAME}"
        echo "versions: ${VERSIONS:-python unknown}, nvcc ${NVCC_VERSION:-absent}; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
        echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
        echo "missing:  ${MISSING:-not checked} (modules the run needs that do not import)"
        echo
        printf '%-8s %-8s %4s %6s %6s\n' stage status rc time limit
        cat "$WORK/stages"
        echo
        cat "$WORK/notes"
        if [ -s "$WORK/goals" ]; then echo; echo "GPU goals ($NAME.json):"; cat "$WORK/goals"; fi
        echo
        echo "test failures and errors:"
        cat "$WORK/failures"
    } >"$OUT/summary.txt.tmp" && mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
}

status=0
run_stage() {  # run_stage NAME LOG LIMIT CMD...: the command under the limit, its output appended to LOG
    local name=$1 log=$2 limit=$3 begin=$SECONDS rc verdict
    shift 3
    if [ "$limit" -lt 5 ]; then
        printf '%-8s %-8s %4s %6s %6s  %s\n' "$name" skipped - - "${limit}s" "(no time left in the budget)" >>"$WORK/stages"
        write_summary "after $name"
        status=1
        return 1
    fi
    write_summary "running $name (limit ${limit}s)"
    echo "== $name: $* (limit ${limit}s)" >>"$OUT/$log"
    timeout -s INT -k 15 "$limit" "$@" >>"$OUT/$log" 2>&1
    rc=$?
    verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict=TIMEOUT
        echo "(stopped at the ${limit}s limit)" >>"$OUT/$log"
    elif [ "$rc" -ne 0 ]; then
        verdict=FAILED
    fi
    [ "$rc" -ne 0 ] && status=1
    printf '%-8s %-8s %4s %5ss %5ss\n' "$name" "$verdict" "$rc" "$((SECONDS - begin))" "$limit" >>"$WORK/stages"
    echo "== $name: $verdict rc=$rc in $((SECONDS - begin))s (limit ${limit}s)"
    tail -n 6 "$OUT/$log" | cut -c1-220
    return "$rc"
}

left() {  # seconds of the budget left after keeping RESERVE for the stages still to come
    local reserve=$1
    echo $((BUDGET - (SECONDS - START) - reserve))
}

min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

has_stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

echo "gpu_check $MODE: $OUT (budget ${BUDGET}s); device: ${GPU_LINE:-$GPU_NAME}"
write_summary "starting"

if has_stage install; then
    # An editable install from pyproject.toml needs setuptools >= 64 (PEP 660) in this environment.
    TOOLS=$("$PY" - 2>&1 <<'EOF'
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
print("pip", version("pip"), "setuptools", version("setuptools"), "wheel", version("wheel"))
EOF
)
    printf '  install tools: %s (the editable install needs setuptools >= 64)\n' "$TOOLS" >>"$WORK/notes"
    run_stage install setup.log "$(min "${LIMIT_INSTALL:-$DEF_INSTALL}" "$(left 60)")" \
        "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
fi

if has_stage build; then
    clear_build_locks "$FROMAGE_FUSED_EXT_DIR" >>"$OUT/setup.log"
    # Load (and if need be JIT-build) the extension, then ask every backend whether it runs here.
    run_stage build setup.log "$(min "${LIMIT_BUILD:-$DEF_BUILD}" "$(left 60)")" "$PY" - "$DEVICE" <<'EOF'
import sys, time
import torch, fromage_fused
from fromage_fused import backends as B
from fromage_fused.backends import native
device = torch.device(sys.argv[1])
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", name)
start = time.perf_counter()
print("extension:", native.load(), "(%.1f s)" % (time.perf_counter() - start))
for backend in B.backend_names():
    start = time.perf_counter()
    try:
        reason = B.get(backend).unavailable_reason(device)
    except Exception as exc:
        reason = "FAILED TO LOAD: %s" % exc
    print("backend %-10s %s (%.1f s)" % (backend, reason or "available", time.perf_counter() - start))
print("available on", device, fromage_fused.available_backends(device))
EOF
    rc=$?
    if [ "$rc" -ne 0 ]; then clear_build_locks "$FROMAGE_FUSED_EXT_DIR" >>"$OUT/setup.log"; fi
    grep -E '^(extension:|backend )' "$OUT/setup.log" | tail -n 8 | sed 's/^/  /' >>"$WORK/notes"
    # The kernels' spill check with this machine's nvcc (the build above compiled the torch glue).
    if command -v nvcc >/dev/null; then
        run_stage nvcc setup.log "$(min "${LIMIT_NVCC:-60}" "$(left 30)")" bash .ci/nvcc_check.sh
        grep -E '^nvcc_check:' "$OUT/setup.log" | tail -n 3 | sed 's/^/  /' >>"$WORK/notes"
    fi
    write_summary "after build"
fi

if has_stage tests; then
    clear_build_locks "$FROMAGE_FUSED_EXT_DIR" >>"$OUT/tests.log"
    EACH=${LIMIT_TEST:-$DEF_TEST_EACH}
    if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
        PER_TEST=(--timeout="$EACH" -o timeout_method=signal)  # pytest-timeout loads itself
    else
        export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_TEST_TIMEOUT=$EACH
        PER_TEST=(-p gpu_check_timeout)
    fi
    WORKERS=()
    if [ "$MODE" = gpu ] && "$PY" -c 'import xdist' 2>/dev/null; then WORKERS=(-n "${TEST_WORKERS:-4}"); fi
    run_stage tests tests.log "$(min "${LIMIT_TESTS:-$DEF_TESTS}" "$(left 45)")" \
        "$PY" -m pytest -m gpu -q -rfEs --durations=15 -p no:cacheprovider --continue-on-collection-errors \
        "${WORKERS[@]}" "${PER_TEST[@]}" ${PYTEST_ARGS:-}
    result=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/tests.log" | grep -E ' in [0-9.]+s' | tail -n 1)
    printf '  tests: %s\n' "${result:-no pytest summary line (see tests.log)}" >>"$WORK/notes"
    grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 40 >"$WORK/failures"
    [ -s "$WORK/failures" ] || echo "none" >"$WORK/failures"
    write_summary "after tests"
fi

if has_stage bench; then
    run_stage bench bench.log "$(min "${LIMIT_BENCH:-100000}" "$(left 15)")" \
        "$PY" -m fromage_fused.bench --quick --device "$DEVICE" --out "$OUT" --name "$NAME" --no-progress "${BENCH_ARGS[@]}"
    if [ -f "$OUT/$NAME.json" ]; then
        mkdir -p "$RESULTS_DIR"
        cp "$OUT/$NAME.json" "$OUT/$NAME.csv" "$RESULTS_DIR/" 2>/dev/null
        [ -f "$OUT/$NAME.png" ] || timeout 30 "$PY" -m fromage_fused.bench --from-json "$OUT/$NAME.json" >/dev/null 2>&1
        [ -f "$OUT/$NAME.png" ] && cp "$OUT/$NAME.png" "$RESULTS_DIR/"
        rows=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["rows"]))' "$OUT/$NAME.json" 2>/dev/null)
        printf '  bench: %s rows in %s.{json,csv,png}, copied to %s\n' "${rows:-?}" "$NAME" "$RESULTS_DIR" >>"$WORK/notes"
        "$PY" benchmarks/gpu_goals.py "$OUT/$NAME.json" >"$WORK/goals" 2>&1 || echo "(goal evaluation failed)" >>"$WORK/goals"
        if [ "$MODE" = rehearsal ]; then sed -i '1i (a CPU rehearsal: the goals apply to a GPU run)' "$WORK/goals"; fi
    else
        printf '  bench: no results file (see bench.log)\n' >>"$WORK/notes"
        status=1
    fi
fi

write_summary "done, exit $status"
echo
cat "$OUT/summary.txt"
exit "$status"
