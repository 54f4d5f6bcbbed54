#!/usr/bin/env bash
# Everything a machine with a GPU checks, in one call: offline install, build of the native
# extension, the gpu-marked tests, and the benchmark on the GPU presets.
#
#   OUT=/dir/for/results bash benchmarks/gpu_check.sh
#
# Writes, flat in $OUT: install.log build.log tests.log bench.log bench-cuda.json bench-cuda.csv
# bench-cuda.png (7 files). Prints one status line per stage and, last, the results table.
# Each stage runs under `timeout`; the limits add up to 445 s (465 s if every stage had to be
# killed), under 8 minutes.
# A benchmark cut off by its limit still leaves the rows it finished (saved after every row).
# Limits can be changed with LIMIT_<STAGE>=seconds; SKIP_INSTALL=1 skips the install.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory for logs and results}"
PY=${PYTHON:-python}
DEVICE=${BENCH_DEVICE:-cuda}
mkdir -p "$OUT"
status=0

stage() {  # stage NAME SECONDS CMD...: output to $OUT/NAME.log; print rc, time and the log's tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "(stopped at the ${limit}s limit)" >>"$OUT/$name.log"; fi
    echo "== $name: rc=$rc in $((SECONDS - start))s (limit ${limit}s)"
    tail -n 8 "$OUT/$name.log" | cut -c1-220
    if [ "$rc" -ne 0 ]; then status=1; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"

if [ -z "${SKIP_INSTALL:-}" ]; then
    stage install "${LIMIT_INSTALL:-40}" "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# Asking every backend whether it runs here loads (and if need be JIT-builds) the native extension.
stage build "${LIMIT_BUILD:-150}" "$PY" -c "
import torch, fromage_fused
from fromage_fused import backends as B
device = torch.device('$DEVICE')
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu')
for name in B.backend_names():
    try:
        reason = B.get(name).unavailable_reason(device)
    except B.BackendUnavailable as exc:
        reason = 'FAILED TO LOAD: %s' % exc
    print('%-10s %s' % (name, reason or 'available'))
print('available on', device, fromage_fused.available_backends(device))
"

stage tests "${LIMIT_TESTS:-70}" "$PY" -m pytest -m gpu -q -rs --durations=10 -p no:cacheprovider

stage bench "${LIMIT_BENCH:-170}" "$PY" -m fromage_fused.bench --quick --device "$DEVICE" --out "$OUT" \
    --name "bench-$DEVICE" --no-progress

echo
if [ -f "$OUT/bench-$DEVICE.json" ]; then
    timeout "${LIMIT_TABLE:-15}" "$PY" -m fromage_fused.bench --from-json "$OUT/bench-$DEVICE.json" || status=1
else
    echo "no benchmark results in $OUT"
    status=1
fi
exit $status
