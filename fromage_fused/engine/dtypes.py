"""Which dtypes a step handles, and in which dtypes it computes and keeps state: one home for both."""
from __future__ import annotations

from typing import Optional

import torch

#: What a step can handle. Complex tensors step through their real view (of the matching real dtype).
REAL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
SUPPORTED_DTYPES = REAL_DTYPES + COMPLEX_DTYPES
#: What the fused kernels (C++, CUDA, Triton) step; float64 groups go to the fallback backend.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Parameters updated in float32 arithmetic and rounded once per step.
LOW_PRECISION = (torch.bfloat16, torch.float16)
REAL = frozenset(REAL_DTYPES)
COMPLEX = frozenset(COMPLEX_DTYPES)
SUPPORTED = frozenset(SUPPORTED_DTYPES)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, inner products, per-tensor sums and the update's arithmetic: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """Elementwise state of a parameter of ``dtype``: float32 for bf16/fp16 parameters, else the parameter's."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def refusal(dtype: torch.dtype, title: str) -> Optional[str]:
    """Why a parameter of ``dtype`` cannot be stepped by optimizer ``title``, and what to do; None if it can."""
    if dtype in SUPPORTED:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
    if not (dtype.is_floating_point or dtype.is_complex):
        return (f"{title} steps floating-point and complex tensors only ({names}), got a {dtype} parameter; "
                "leave integer and bool tensors out of the optimizer (buffers, or requires_grad=False)")
    return (f"{title} cannot step {dtype} parameters (it steps {names}); keep the weights in one of these "
            "(e.g. bfloat16 or float32 master weights) and cast to the low-precision format for compute")
