"""200 steps through every backend reproduce recorded bits: parameters and state, hashed.

The hashes in ``recorded_steps.json`` were taken from the code as it was before a change that must
not change any result (a refactoring): after it, every case must give the same bits. A case is a
backend, a dtype (fp32, bf16 with and without stochastic rounding, fp16, fp64, complex64) and an
option set (p_bound, maximize, prefactor=False, loss scaling with skipped steps, a tensor lr, all
of them together), stepped 200 times through ``Fromage`` with gradients that are sometimes None and
sometimes zero, from a zero-initialised tensor (the fallback branch) and tensors of several chunks.

The bits depend on the environment as well as on the code: torch's own kernels (the foreach and
reference backends) and numpy's (Triton's interpreter) sum in an order that depends on the torch
version and the CPU's vector width. So recordings are kept per environment (a fingerprint of those);
an environment without a recording skips, saying how to make one:

    python tests/test_recorded_steps.py record    # (re)records this environment's section

Triton runs under its interpreter, one Python program at a time: its cases use two tensors, every
dtype with all options, and each option alone on fp32.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import _triton_interpreter  # noqa: F401  (before anything imports the kernels)
import fromage_fused
from fromage_fused import Fromage

DATA = Path(__file__).with_name("recorded_steps.json")
STEPS = 200
LRS = (0.01, 0.05)  # the lr changes half-way (in place when it is a tensor)
SCALE = 2.0 ** 10
SKIPPED = {3, 50, 51, 120}  # steps whose found_inf is set under loss scaling
SHAPES = [(3, 5), (2049,), (0,), (1,), (33000,)]  # index 0 starts at zero
TRITON_SHAPES = SHAPES[:2]
DTYPES = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "bf16_sr": (torch.bfloat16, True),
    "fp16": (torch.float16, False),
    "fp64": (torch.float64, False),
    "complex64": (torch.complex64, False),
}
OPTIONS = {
    "plain": {},
    "p_bound": dict(p_bound=0.9),
    "maximize": dict(maximize=True),
    "prefactor_off": dict(prefactor=False),
    "scaled": dict(scaled=True),
    "all": dict(p_bound=0.9, maximize=True, prefactor=False, scaled=True, tensor_lr=True),
}
BACKENDS = ("reference", "foreach", "cpu", "triton")


def cases():
    for backend in BACKENDS:
        for dname in DTYPES:
            for oname in OPTIONS:
                if backend == "triton" and oname != "all" and dname != "fp32":
                    continue
                if backend == "triton" and dname == "fp64":
                    continue  # the kernel backends step fp64 with foreach: the foreach cases cover it
                yield f"{backend}-{dname}-{oname}"


def environment() -> str:
    """What the bits depend on besides the code."""
    import numpy

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return (f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, "
            f"numpy {numpy.__version__}, triton {triton_version}")


def _tensors(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            t = torch.complex(t, torch.randn(shape, generator=gen, dtype=torch.float64))
        if i == 0:
            t.zero_()
        out.append(t.to(dtype))
    return out


def _grad(step, i, shape, dtype):
    """Sometimes None, sometimes zero, else random with a scale that depends on the tensor."""
    if (i + step) % 7 == 0:
        return None
    if (i + step) % 5 == 0:
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(1000 * step + i)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        t = torch.complex(t, torch.randn(shape, generator=gen, dtype=torch.float64))
    return (t * 10.0 ** ((i % 3) - 1)).to(dtype)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def run_case(case: str) -> str:
    backend, dname, oname = case.split("-")
    dtype, sr = DTYPES[dname]
    options = dict(OPTIONS[oname])
    scaled, tensor_lr = options.pop("scaled", False), options.pop("tensor_lr", False)
    shapes = TRITON_SHAPES if backend == "triton" else SHAPES
    params = [torch.nn.Parameter(t) for t in _tensors(shapes, dtype, seed=5)]
    lr = torch.tensor(LRS[0]) if tensor_lr else LRS[0]
    opt = Fromage(params, lr=lr, backend=backend, stochastic_rounding=sr, seed=11, **options)
    for step in range(STEPS):
        if step == STEPS // 2:
            if tensor_lr:
                lr.fill_(LRS[1])
            else:
                opt.param_groups[0]["lr"] = LRS[1]
        for i, (p, shape) in enumerate(zip(params, shapes)):
            g = _grad(step, i, shape, dtype)
            p.grad = None if g is None else (g * SCALE if scaled else g)
        if scaled:
            opt.grad_scale = torch.tensor(SCALE)
            opt.found_inf = torch.tensor(1.0 if step in SKIPPED else 0.0)
        opt.step()
        for name in ("grad_scale", "found_inf"):
            opt.__dict__.pop(name, None)
    state = [opt.state[p][key] for p in params for key in sorted(opt.state.get(p, {}))]
    return _digest(list(params) + state)


def _recorded():
    if not DATA.is_file():
        return {}
    return json.loads(DATA.read_text())


def _available(backend):
    return backend in fromage_fused.available_backends("cpu")


@pytest.mark.parametrize("case", list(cases()))
def test_recorded_bits(case, one_thread):
    section = _recorded().get(environment())
    if section is None:
        pytest.skip(f"no recording for this environment ({environment()}); record one with: "
                    f"python tests/{Path(__file__).name} record")
    backend = case.split("-")[0]
    if not _available(backend):
        pytest.skip(f"backend {backend} does not run here")
    assert case in section, f"{case} was not recorded for this environment"
    assert run_case(case) == section[case], f"{case}: the bits differ from the recording"


def record() -> None:
    torch.set_num_threads(1)
    data = _recorded()
    section = {}
    for case in cases():
        if _available(case.split("-")[0]):
            section[case] = run_case(case)
            print(case, section[case], flush=True)
    data[environment()] = section
    DATA.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit(f"usage: python {sys.argv[0]} record")
    record()
