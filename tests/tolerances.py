"""Tolerances of every backend against the float64 oracle, as data: dtype -> check -> (atol, rtol).

rtol is relative to the largest magnitude of the tensor (a per-tensor, not per-element, bound).
"traj": after N steps from the same start with the same gradients; "step": one step from the
backend's own previous values (what a format that rounds every step can be held to).
"""
import torch

ORACLE_TOL = {
    torch.float64: {"traj": (1e-12, 1e-11), "step": (1e-13, 1e-12)},
    torch.float32: {"traj": (1e-6, 1e-5), "step": (1e-7, 1e-6)},
    # one rounding of the result: half an ulp of the largest element, plus fp32 arithmetic
    torch.bfloat16: {"step": (1e-3, 2 ** -8)},
    torch.float16: {"step": (1e-4, 2 ** -11)},
}

#: reference backend vs the literal float64 transcription (test_reference.py), relative to the
#: tensor's largest magnitude: the two differ only in how the post-update norm is computed.
LITERAL_TOL = 1e-12

#: hand-computed expected values (test_update_rule.py): dtype -> (atol, rtol) per element.
HAND_TOL = {
    torch.float64: (1e-14, 1e-14),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-2, 2 ** -8),
    torch.float16: (1e-3, 2 ** -11),
}

#: property tests (test_properties.py): relative rounding slack of a norm computed from one step's
#: result in each dtype (a few ulps of the accumulation, half an ulp of the stored result).
PROPERTY_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2 ** -8,
    torch.float16: 2 ** -11,
}

#: absolute error of ||Δp||/||p|| measured on one step's result (test_properties.py): the result is
#: rounded once per element, so the ratio is off by about an ulp of the dtype.
RATIO_ATOL = {torch.float64: 1e-13, torch.float32: 5e-7}

#: one step with stochastic rounding to bf16 (test_option_matrix.py): the result may land on either
#: neighbour, so up to one ulp of the largest element (2**-7 relative) instead of half.
SR_STEP_TOL = (1e-3, 2 ** -7)

#: the LARS and LAMB oracles against timm's Lars and Lamb in float64 (test_lars_lamb_oracles.py),
#: per element (atol, rtol): both are float64 loops over the same formulas in different orders.
TIMM_PARITY_TOL = (1e-12, 1e-12)

#: the emulated CUDA stats kernel (test_cuda_emulated.py) against float64 sums, relative to the sum of
#: the terms' magnitudes: per-thread fp32 chains of at most 128 fused multiply-adds, then a fixed tree.
EMULATED_STATS_RTOL = 1e-5
