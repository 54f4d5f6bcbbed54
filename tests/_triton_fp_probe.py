"""Compile the Triton apply kernel for sm_90 on this machine (no GPU needed), with the launch
options the backend uses, and count the fp32 arithmetic in its PTX.

Run as a script in a process without TRITON_INTERPRET; prints one JSON object
``{variant: {instruction: count}}``. The documented bit-identity promise needs every fp32 product and
sum rounded on its own (``mul.rn``/``add.rn``/``sub.rn``), no ``fma``, correctly rounded division and
square root (``div.rn``/``sqrt.rn``, no ``approx``/``full``), and no flushing of subnormals (``ftz``).
"""
import json
import re

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from fromage_fused.backends.triton import CUDA_CONFIGS
from fromage_fused.kernels import fromage_apply
from _triton_ptx_probe import APPLY_SIG, _source

PATTERNS = {
    "fma": r"\bfma\.\S*f32",
    "mul_rn": r"\bmul\.rn\.f32",
    "add_rn": r"\badd\.rn\.f32",
    "sub_rn": r"\bsub\.rn\.f32",
    "div_rn": r"\bdiv\.rn\.f32",
    "sqrt_rn": r"\bsqrt\.rn\.f32",
    "unrounded": r"\b(?:mul|add|sub|div|sqrt)\.f32",
    "approx_or_full": r"\.(?:approx|full)\.\S*f32",
    "ftz": r"\.ftz\.\S*f32",
}


def counts(constexprs):
    constexprs = dict(constexprs)
    options = {"num_warps": constexprs.pop("_num_warps"), **getattr(fromage_apply, "LAUNCH_OPTIONS", {})}
    kernel = triton.compile(_source(fromage_apply.apply_kernel, APPLY_SIG, constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    return {k: len(re.findall(p, ptx)) for k, p in PATTERNS.items()}


def main():
    flags = {"HAS_BOUND": True, "MAXIMIZE": True, "PREFACTOR": True, "HAS_FOUND_INF": True, "HAS_GRAD_SCALE": True,
             "PATHS": 3}

    def size(dtype):  # the block and warps the backend launches this dtype with
        cfg = CUDA_CONFIGS[dtype]
        return {"BLOCK": cfg.block, "_num_warps": cfg.num_warps}

    out = {
        "fp32": counts({"DTYPE": tl.float32, "SR": False, **flags, **size(torch.float32)}),
        "bf16_sr": counts({"DTYPE": tl.bfloat16, "SR": True, **flags, **size(torch.bfloat16)}),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
