"""Compile the triton kernels (Fromage's, LARS's, LAMB's) for sm_90 on this machine (no GPU needed) and
count what the tests check.

Run as a script in a process without TRITON_INTERPRET; prints one JSON object
``{kernel: {"ld_v": n, "st_v": n, "ld_16": n, "st_16": n, "st_shared": n, "bar_sync": n,
"ld_volatile": n, "atom_exch": n, "regs": n, "per_thread": n, "lists": n}}``: vector accesses of any width and the
16-byte ones, shared-memory stores and barriers, relaxed loads and atomic exchanges (the max_norm
accesses), the registers per thread of the sm_90 cubin (None when Triton ships no cuobjdump), and
the elements of each operand a thread moves per block, and the lists the kernel reads.

``--paths N`` compiles the kernels' PATHS=N specialisation (1: only the 16-byte aligned path, 2: only
the other, 3: both, the default). With ``--no-aligned-path`` the branch taken for 16-byte aligned
tensors is compiled away first, so what remains is the path for everything else, which must not
contain a single vector access (a misaligned one faults on a GPU; the interpreter cannot tell).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import torch

from fromage_fused.backends.triton import CUDA_CONFIGS, block_for
from fromage_fused.kernels import engine_pass, rule_fromage, rule_lamb, rule_lars

if "--no-aligned-path" in sys.argv:
    engine_pass.ALIGNED_FLAG = tl.constexpr(0)
PATHS = int(sys.argv[sys.argv.index("--paths") + 1]) if "--paths" in sys.argv else 3

TABLE = {"layout_ptr": "*i64", "addrs_ptr": "*i64"}
PASS_SIG = {**TABLE, "partials_ptr": "*fp32", "sums_ptr": "*fp32", "hyper_ptr": "*fp32", "s0_ptr": "*fp32",
            "s1_ptr": "*fp32", "globals_ptr": "*fp32", "found_inf_ptr": "*fp32", "grad_scale_ptr": "*fp32",
            "seed_ptr": "*i64", "n": "i64", "COEF": "constexpr", "BODY": "constexpr", "L": "constexpr",
            "W": "constexpr", "S": "constexpr", "D0": "constexpr", "D1": "constexpr", "D2": "constexpr",
            "D3": "constexpr", "Z0": "constexpr", "Z1": "constexpr", "Z2": "constexpr", "Z3": "constexpr",
            "FLAGS": "constexpr", "BLOCK": "constexpr", "HAS_FOUND_INF": "constexpr",
            "HAS_GRAD_SCALE": "constexpr", "SR": "constexpr", "PATHS": "constexpr", "LR_SLOT": "constexpr"}
#: Fromage's flags: maximize 1, prefactor 2, bound 4, inner 8 (kernels/rule_fromage.py)
STATS_FLAGS = 8
APPLY_FLAGS = 2 | 4 | 8


def fromage_pass(index, dtype, *, sr=False, flags=None):
    """The constexprs of Fromage's pass ``index`` on ``dtype`` tensors, as the backend launches it."""
    coef, body, _ = rule_fromage.PASSES[index]
    size = dtype.primitive_bitwidth // 8
    return {"COEF": coef, "BODY": body, "L": 2, "W": index, "S": 3 if index == 0 else 0, "D0": dtype, "D1": dtype,
            "D2": dtype, "D3": dtype, "Z0": size, "Z1": size, "Z2": size, "Z3": size,
            "FLAGS": (STATS_FLAGS if index == 0 else APPLY_FLAGS) if flags is None else flags,
            "HAS_FOUND_INF": index == 1, "HAS_GRAD_SCALE": index == 1, "SR": sr,
            "LR_SLOT": rule_fromage.LR.value if index == 1 else -1, "PATHS": PATHS}


def rule_pass(helpers, index, lists, writes, sums, dtype, flags, sr=False):
    """The constexprs of pass ``index`` of another rule's ``helpers`` (``kernels/rule_<name>.py``):
    ``lists`` says per list whether it holds the parameters' dtype (else float32: a buffer)."""
    coef, body, _ = helpers.PASSES[index]
    types = [dtype if param else tl.float32 for param in lists] + [dtype] * (4 - len(lists))
    sizes = [t.primitive_bitwidth // 8 for t in types]
    return {"COEF": coef, "BODY": body, "L": len(lists), "W": writes, "S": sums,
            **{f"D{k}": types[k] for k in range(4)}, **{f"Z{k}": sizes[k] for k in range(4)}, "FLAGS": flags,
            "HAS_FOUND_INF": writes > 0, "HAS_GRAD_SCALE": True, "SR": sr,
            "LR_SLOT": helpers.LR.value if writes > 0 else -1, "PATHS": PATHS,
            "BLOCK": block_for(CUDA_CONFIGS[_TORCH[dtype]], len(lists), writes, sums, sr)}


_TORCH = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}


def rule_options(helpers, index):
    return {} if helpers.PASSES[index][2] else {"enable_fp_fusion": False}


#: LARS with momentum, adapting (nesterov, trust_clip), and monitored; LAMB adapting with caution and
#: clipping (every list and sum), monitored with a decoupled decay, and as Adam: (name, helpers, pass,
#: lists, writes, sums, flags)
OTHER_RULES = (
    ("lars_stats", rule_lars, 0, (True, True), 0, 2, 1 | 2 | 8 | 16),
    ("lars_update", rule_lars, 1, (True, False, True), 2, 0, 1 | 2 | 8 | 16),
    ("lars_update_monitored", rule_lars, 1, (True, False, True), 2, 1, 1 | 2 | 8 | 16 | 32),
    ("lamb_grad_norm", rule_lamb, 0, (True,), 0, 1, 1 | 2 | 16 | 128 | 256 | 512),
    ("lamb_moments", rule_lamb, 1, (False, False, True, True), 2, 5, 1 | 2 | 16 | 128 | 256 | 512),
    ("lamb_moments_monitored", rule_lamb, 1, (False, False, True, True), 2, 5,
     1 | 2 | 16 | 32 | 128 | 256 | 512 | 2048),
    ("lamb_update", rule_lamb, 2, (True, False, False, True), 1, 0, 1 | 2 | 16 | 128 | 256 | 512),
    ("lamb_adam", rule_lamb, 3, (True, False, False, True), 3, 0, 1 | 2 | 128 | 1024),
)


def fromage_options(index):
    """The launch options of Fromage's pass ``index`` (its unfused passes compile without fusion)."""
    return {} if rule_fromage.PASSES[index][2] else {"enable_fp_fusion": False}


def _source(fn, signature, constexprs):
    try:
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError:  # Triton before 3.3 calls them constants
        return ASTSource(fn=fn, signature=signature, constants=constexprs)


def registers(cubin: bytes):
    """Registers per thread of a cubin, from the cuobjdump Triton ships (None without one)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)", out)
    return int(found.group(1)) if found else None


def count(fn, signature, constexprs, dtype, options=None):
    cfg = CUDA_CONFIGS[dtype]
    constexprs = {"BLOCK": cfg.block, **constexprs, "PATHS": PATHS}
    kernel = triton.compile(_source(fn, signature, constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps, **(options or {})})
    ptx = kernel.asm["ptx"]
    # Any vector access (it needs more than the element's alignment), and the 16-byte ones.
    vector, wide = r"\.v[248]\.", r"\.(?:v4\.[bfsu]32|v2\.[bfsu]64)"
    return {"ld_v": len(re.findall(r"ld\.global(?:\.\w+)*" + vector, ptx)),
            "st_v": len(re.findall(r"st\.global(?:\.\w+)*" + vector, ptx)),
            "ld_16": len(re.findall(r"ld\.global(?:\.\w+)*" + wide, ptx)),
            "st_16": len(re.findall(r"st\.global(?:\.\w+)*" + wide, ptx)),
            "st_shared": len(re.findall(r"\bst\.shared\b", ptx)),
            "bar_sync": len(re.findall(r"\bbar\.sync\b", ptx)),
            "ld_volatile": len(re.findall(r"\bld\.volatile\.global\b", ptx)),
            "atom_exch": len(re.findall(r"\batom\.global(?:\.\w+)*\.exch\b", ptx)),
            "regs": registers(kernel.asm["cubin"]),
            # elements of each operand a thread moves per block
            "per_thread": constexprs["BLOCK"] // (32 * cfg.num_warps), "lists": constexprs["L"]}


def main():
    kernel = engine_pass.pass_kernel
    out = {
        "partials_fp32": count(kernel, PASS_SIG, fromage_pass(0, tl.float32), torch.float32, fromage_options(0)),
        "partials_bf16": count(kernel, PASS_SIG, fromage_pass(0, tl.bfloat16), torch.bfloat16, fromage_options(0)),
        "partials_fp16": count(kernel, PASS_SIG, fromage_pass(0, tl.float16), torch.float16, fromage_options(0)),
        "apply_fp32": count(kernel, PASS_SIG, fromage_pass(1, tl.float32), torch.float32, fromage_options(1)),
        "apply_bf16": count(kernel, PASS_SIG, fromage_pass(1, tl.bfloat16), torch.bfloat16, fromage_options(1)),
        "apply_bf16_sr": count(kernel, PASS_SIG, fromage_pass(1, tl.bfloat16, sr=True), torch.bfloat16,
                               fromage_options(1)),
        "apply_fp16": count(kernel, PASS_SIG, fromage_pass(1, tl.float16), torch.float16, fromage_options(1)),
    }
    for name, helpers, index, lists, writes, sums, flags in OTHER_RULES:
        for label, tdt, dtype in (("fp32", tl.float32, torch.float32), ("bf16", tl.bfloat16, torch.bfloat16)):
            out[f"{name}_{label}"] = count(kernel, PASS_SIG, rule_pass(helpers, index, lists, writes, sums, tdt, flags),
                                           dtype, rule_options(helpers, index))
        # the passes that write bf16 parameters, rounding stochastically
        if name in ("lars_update", "lars_update_monitored", "lamb_update"):
            out[f"{name}_bf16_sr"] = count(kernel, PASS_SIG, rule_pass(helpers, index, lists, writes, sums, tl.bfloat16,
                                                                       flags, sr=True),
                                           torch.bfloat16, rule_options(helpers, index))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
