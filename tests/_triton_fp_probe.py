"""Compile the Triton kernel of Fromage's update pass for sm_90 on this machine (no GPU needed), with the launch
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
from fromage_fused.kernels import engine_pass, rule_fromage
from _triton_ptx_probe import PASS_SIG, _source, fromage_pass

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
    # Fromage's pass 1 runs without multiply-add fusion (rule_fromage.PASSES), as the backend launches it.
    fusion = rule_fromage.PASSES[1][2]
    options = {"num_warps": constexprs.pop("_num_warps"), **({} if fusion else {"enable_fp_fusion": False})}
    kernel = triton.compile(_source(engine_pass.pass_kernel, PASS_SIG, constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    return {k: len(re.findall(p, ptx)) for k, p in PATTERNS.items()}


def main():
    flags = 1 | 2 | 4 | 8  # maximize, prefactor, bound, inner

    def size(dtype):  # the block and warps the backend launches this dtype with
        cfg = CUDA_CONFIGS[dtype]
        return {"BLOCK": cfg.block, "_num_warps": cfg.num_warps}

    out = {
        "fp32": counts({**fromage_pass(1, tl.float32, flags=flags), **size(torch.float32)}),
        "bf16_sr": counts({**fromage_pass(1, tl.bfloat16, sr=True, flags=flags), **size(torch.bfloat16)}),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
