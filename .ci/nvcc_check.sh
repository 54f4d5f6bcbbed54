#!/usr/bin/env bash
# Compile the CUDA kernels (csrc/*.cu, CUDA headers only) with this machine's nvcc for sm_80 and
# sm_90, so they cannot rot where no GPU runs them. Fails on a compile error or any register spill.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then
    echo "nvcc_check: $NVCC not found (set NVCC=/path/to/nvcc)"
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for cu in csrc/*.cu; do
    log="$out/$(basename "$cu").log"
    if ! "$NVCC" -std=c++17 -O3 -Icsrc -c "$cu" -o "$out/$(basename "$cu").o" \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xptxas -v >"$log" 2>&1; then
        cat "$log"
        echo "nvcc_check: $cu failed to compile"
        status=1
        continue
    fi
    kernels=$(grep -c "Compiling entry function" "$log" || true)
    spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" || true)
    if [ -n "$spills" ]; then
        grep -E "Compiling entry function|spill" "$log"
        echo "nvcc_check: $cu spills registers"
        status=1
    elif grep -qiE "warning" "$log"; then
        grep -iE "warning" "$log"
        echo "nvcc_check: $cu compiles with warnings"
        status=1
    else
        echo "nvcc_check: $cu OK ($kernels kernel builds for sm_80+sm_90, no spills)"
    fi
done
# The torch glue needs a CUDA build of torch's headers; checked when they are given, e.g. unzipped
# from a CUDA torch wheel: TORCH_CUDA_INCLUDE=/path/to/torch/include .ci/nvcc_check.sh. With
# TORCH_CUDA_LIB=/path/to/torch/lib too, every torch symbol the glue uses must be defined there,
# and every function it calls in the kernels' object too (what the link at load time needs).
if [ -n "${TORCH_CUDA_INCLUDE:-}" ]; then
    cuda_top=${CUDA_HOME:-$("$NVCC" -v --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')}
    cuda_inc=$cuda_top/include
    if "${CXX:-c++}" -std=c++20 -O1 -fPIC -c -Icsrc -isystem "$TORCH_CUDA_INCLUDE" \
        -isystem "$TORCH_CUDA_INCLUDE/torch/csrc/api/include" -isystem "$cuda_inc" csrc/engine_cuda_ops.cpp \
        -o "$out/ops.o"; then
        echo "nvcc_check: csrc/engine_cuda_ops.cpp OK against $TORCH_CUDA_INCLUDE"
    else
        echo "nvcc_check: csrc/engine_cuda_ops.cpp failed against $TORCH_CUDA_INCLUDE"
        status=1
    fi
    if [ -n "${TORCH_CUDA_LIB:-}" ] && [ -f "$out/ops.o" ]; then
        for lib in "$TORCH_CUDA_LIB"/libc10*.so "$TORCH_CUDA_LIB"/libtorch*.so; do
            [ -f "$lib" ] && nm -DC --defined-only "$lib" | sed -E 's/^[0-9a-f]+ [A-Za-z] //'
        done >"$out/defined.txt"
        nm -C --defined-only "$out"/*.cu.o | sed -E 's/^[0-9a-f]+ [A-Za-z] //' >>"$out/defined.txt"
        nm -uC "$out/ops.o" | sed -E 's/^ *U //' | grep -E '^(c10|at|ff)::' | sort -u >"$out/used.txt"
        missing=$(grep -vxF -f "$out/defined.txt" "$out/used.txt" || true)
        if [ -n "$missing" ]; then
            echo "$missing" | head -n 20
            echo "nvcc_check: csrc/engine_cuda_ops.cpp uses symbols that $TORCH_CUDA_LIB and the kernels do not define"
            status=1
        else
            echo "nvcc_check: csrc/engine_cuda_ops.cpp links: $(wc -l <"$out/used.txt") torch and kernel symbols defined"
        fi
    fi
fi
exit "$status"
