"""Groups of tensors for the emulated CUDA kernels, and the checks of what the kernels wrote.

A group is laid out as the CUDA path receives one (views aligned or not, empty tensors with a null
address or not), stepped by a job of launches (stats, then apply with found_inf set, which must change
nothing, then apply), and checked independently of the kernel code:

- the stats against float64 sums, within ``tolerances.EMULATED_STATS_RTOL``;
- the parameters and max_norm bit for bit against ``_bit_model`` (the README's "Bit-identical
  results": the coefficients and the update in fp32 with one rounding per operation, the bf16
  roundings in integer arithmetic), from the stats the kernel computed;
- the whole step against the float64 oracle (``_oracle.literal_step``) within ``ORACLE_TOL``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

import numpy as np
import torch

import _bit_model as bm
from _cuda_emu import Job, Result, View, pack_i64, tensor_args
from _oracle import literal_step
from tolerances import EMULATED_STATS_RTOL, ORACLE_TOL, SR_STEP_TOL

#: Sizes around the kernels' block of 65,536 elements: empty, tiny, one full block, one element more,
#: two blocks and a bit, several blocks, and an empty tensor last: in every group, an empty last
#: tensor has a null address (what torch's caching allocator gives for 0 bytes).
SIZES = (0, 1, 3, 65536, 65537, 131584, 200001, 0)
ZERO_GRAD, ZERO_PARAM = 2, 1  # the fallback branch: ||g|| = 0, ||p|| = 0


@dataclass(frozen=True)
class Format:
    name: str
    code: str  # the harness's dtype
    itemsize: int
    sr: bool = False
    torch_dtype: torch.dtype = torch.float32


FORMATS = {
    "fp32": Format("fp32", "f32", 4),
    "bf16": Format("bf16", "bf16", 2, torch_dtype=torch.bfloat16),
    "bf16-sr": Format("bf16-sr", "bf16", 2, sr=True, torch_dtype=torch.bfloat16),
    "fp16": Format("fp16", "f16", 2, torch_dtype=torch.float16),
}

#: How the views sit in memory: 16-byte aligned; parameter and gradient misaligned by the same
#: amount (a few elements into their buffers); misaligned differently (the gradient aligned).
ALIGNMENTS = ("aligned", "same", "mixed")


def narrow(y32: np.ndarray, fmt: Format, seed: int = 0, tensor: int = 0) -> np.ndarray:
    """fp32 values in the storage format (bits for bf16), rounded as the README says."""
    y32 = np.ascontiguousarray(y32, dtype=np.float32)
    if fmt.code == "f32":
        return y32
    if fmt.code == "f16":
        return y32.astype(np.float16)
    bits = y32.view(np.uint32)
    return bm.sr_bits(bits, seed, tensor) if fmt.sr else bm.rne_bits(bits)


def widen(stored: np.ndarray, fmt: Format) -> np.ndarray:
    if fmt.code == "bf16":
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return stored.astype(np.float32)


def as_tensor(stored: np.ndarray, fmt: Format) -> torch.Tensor:
    """A storage array (bf16 as bits) as a torch tensor of the format's dtype (a copy)."""
    if fmt.code == "bf16":
        return torch.from_numpy(stored.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(stored.copy())


def as_stored(t: torch.Tensor, fmt: Format) -> np.ndarray:
    """A torch tensor as the storage array of its format (bf16 as bits)."""
    return t.view(torch.int16).numpy().view(np.uint16) if fmt.code == "bf16" else t.numpy()


def from_bytes(raw: bytes, fmt: Format) -> np.ndarray:
    return np.frombuffer(raw, dtype={"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[fmt.code]).copy()


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise bit equality, any NaN equal to any NaN (fp32/fp16 payloads follow the hardware;
    bf16 bits are compared as they are: every NaN rounds to 0x7FC0)."""
    if a.dtype == np.uint16:
        return a == b
    bits = np.uint16 if a.itemsize == 2 else np.uint32
    return (a.view(bits) == b.view(bits)) | (np.isnan(a) & np.isnan(b))


@dataclass
class Group:
    fmt: Format
    alignment: str
    p: List[np.ndarray]  # storage arrays (bf16 as bits)
    g: List[np.ndarray]
    max_norm: np.ndarray  # float32 [n]
    null: List[bool]
    lr: float = 0.01
    p_bound: Optional[float] = 1.5
    grad_scale: Optional[float] = 1024.0
    maximize: bool = False
    prefactor: bool = True
    seed: int = 12345
    found_inf: bool = True  # also run the apply with found_inf set (it must change nothing)
    tag: str = field(default="")

    @property
    def n(self) -> int:
        return len(self.p)

    def leads(self, t: int):
        """Byte offsets of tensor t's parameter and gradient views into their buffers."""
        per16 = 16 // self.fmt.itemsize
        k = 1 + t % (per16 - 1)  # never a multiple of 16 bytes
        if self.alignment == "aligned":
            return 0, 0
        if self.alignment == "same":
            return k * self.fmt.itemsize, k * self.fmt.itemsize
        return k * self.fmt.itemsize, 0


def make_group(fmt: Format, alignment: str, sizes=SIZES, seed: int = 0, **kw) -> Group:
    rng = np.random.default_rng(seed)
    p, g = [], []
    for t, size in enumerate(sizes):
        scale = 10.0 ** rng.uniform(-3, 1)
        x = rng.standard_normal(size) * scale
        y = rng.standard_normal(size) * 10.0 ** rng.uniform(-5, 0)
        if t == ZERO_GRAD:
            y[:] = 0
        if t == ZERO_PARAM:
            x[:] = 0
        p.append(narrow(x.astype(np.float32), replace(fmt, sr=False)))
        g.append(narrow(y.astype(np.float32), replace(fmt, sr=False)))
    # Unset, set below the step's norm (the clamp acts), set far above.
    norms = [float(np.linalg.norm(widen(x, fmt).astype(np.float64))) for x in p]
    mn = np.array([[-1.0, 0.5 * v, 1e30][t % 3] for t, v in enumerate(norms)], dtype=np.float32)
    null = [t == len(sizes) - 1 and size == 0 for t, size in enumerate(sizes)]
    return Group(fmt, alignment, p, g, mn, null, **kw)


def scalar(job: Job, value, dtype=np.float32) -> str:
    return job.buffer(np.array([value], dtype=dtype))


def add_step(job: Job, group: Group, prefix: str = "") -> None:
    """Buffers of ``group`` and its launches: stats (with and without <p,g>), apply under found_inf
    (if asked), apply; every result is dumped under ``prefix``."""
    fmt = group.fmt
    views = []
    for t in range(group.n):
        lead_p, lead_g = group.leads(t)
        if group.null[t]:
            pv = gv = View(None, 0, 0, fmt.itemsize)
        else:
            pv = View(job.buffer(group.p[t], lead=lead_p, name=f"{prefix}p{t}"), 0, group.p[t].size, fmt.itemsize)
            gv = View(job.buffer(group.g[t], lead=lead_g, name=f"{prefix}g{t}"), 0, group.g[t].size, fmt.itemsize)
        views.append((pv, gv))
    tensors = tensor_args(views)
    stats = job.buffer(3 * 4 * group.n, name=f"{prefix}stats")
    plain = job.buffer(3 * 4 * group.n, name=f"{prefix}stats0")
    job.launch("stats", fmt.code, 1, stats, *tensors)
    job.launch("stats", fmt.code, 0, plain, *tensors)
    job.dump(stats)
    job.dump(plain)
    mn = job.buffer(group.max_norm, name=f"{prefix}mn") if group.p_bound is not None else None
    lr = scalar(job, group.lr)
    gs = scalar(job, group.grad_scale) if group.grad_scale is not None else None
    seed = job.buffer(pack_i64(group.seed)) if fmt.sr else None
    p_bound = float(group.p_bound) if group.p_bound is not None else 0.0
    flags = (p_bound, group.maximize, group.prefactor)
    if group.found_inf:
        job.launch("apply", fmt.code, fmt.sr, *tensors, mn, stats, lr, scalar(job, 1.0), gs, seed, *flags)
        for t in range(group.n):
            if not group.null[t]:
                job.dump(f"{prefix}p{t}", f"{prefix}skipped_p{t}")
        if mn is not None:
            job.dump(mn, f"{prefix}skipped_mn")
    job.launch("apply", fmt.code, fmt.sr, *tensors, mn, stats, lr, scalar(job, 0.0) if group.found_inf else None, gs,
               seed, *flags)
    for t in range(group.n):
        if not group.null[t]:
            job.dump(f"{prefix}p{t}")
    if mn is not None:
        job.dump(mn)


def expected_step(group: Group, stats: np.ndarray):
    """(parameters, max_norm) the apply phase must write from these stats: the README's bit model."""
    cp, cg, mn = bm.coefficients(stats, group.lr, max_norm=group.max_norm if group.p_bound is not None else None,
                                 p_bound=group.p_bound, maximize=group.maximize, prefactor=group.prefactor,
                                 grad_scale=group.grad_scale)
    out = []
    for t in range(group.n):
        y = bm.update(widen(group.p[t], group.fmt), widen(group.g[t], group.fmt), cp[t], cg[t])
        out.append(narrow(y, group.fmt, group.seed, t))
    return out, mn


def check(group: Group, result: Result, prefix: str = "") -> List[str]:
    """What is wrong with a run of ``add_step(group)``, as sentences (empty: nothing)."""
    if result.report is not None:
        return [f"{result.report} report (exit {result.returncode}): {result.stderr[-4000:]}"]
    fmt, problems = group.fmt, []
    stats = np.frombuffer(result.dumps[f"{prefix}stats"], dtype=np.float32).reshape(group.n, 3).copy()
    plain = np.frombuffer(result.dumps[f"{prefix}stats0"], dtype=np.float32).reshape(group.n, 3)
    for t in range(group.n):
        x, y = widen(group.p[t], fmt).astype(np.float64), widen(group.g[t], fmt).astype(np.float64)
        want = (x @ x, y @ y, x @ y)
        scale = (x @ x, y @ y, np.abs(x) @ np.abs(y))
        for k in range(3):
            if not abs(stats[t, k] - want[k]) <= EMULATED_STATS_RTOL * scale[k]:
                problems.append(f"tensor {t} ({x.size} elements): stats[{k}] {stats[t, k]!r}, float64 {want[k]!r}")
        if not (plain[t, 0] == stats[t, 0] and plain[t, 1] == stats[t, 1] and plain[t, 2] == 0):
            problems.append(f"tensor {t}: stats without <p,g> {plain[t].tolist()} vs {stats[t].tolist()}")
    want_p, want_mn = expected_step(group, stats)
    for t in range(group.n):
        if group.null[t]:
            continue
        if group.found_inf:
            skipped = from_bytes(result.dumps[f"{prefix}skipped_p{t}"], fmt)
            if not np.all(same_bits(skipped, group.p[t])):
                problems.append(f"tensor {t}: changed under found_inf")
        got = from_bytes(result.dumps[f"{prefix}p{t}"], fmt)
        bad = np.flatnonzero(~same_bits(got, want_p[t]))
        if bad.size:
            i = bad[0]
            problems.append(f"tensor {t} ({got.size} elements): {bad.size} elements differ from the bit model, first "
                            f"at {i}: {widen(got[i:i + 1], fmt)[0]!r} vs {widen(want_p[t][i:i + 1], fmt)[0]!r}")
    if group.p_bound is not None:
        got_mn = np.frombuffer(result.dumps[f"{prefix}mn"], dtype=np.float32)
        if not np.all(same_bits(got_mn, want_mn)):
            problems.append(f"max_norm {got_mn.tolist()} vs the model's {want_mn.tolist()}")
        if group.found_inf and not np.all(same_bits(np.frombuffer(result.dumps[f"{prefix}skipped_mn"], np.float32),
                                                    group.max_norm)):
            problems.append("max_norm changed under found_inf")
    if not problems:
        problems += against_oracle(group, [from_bytes(result.dumps[f"{prefix}p{t}"], fmt) if not group.null[t]
                                           else group.p[t] for t in range(group.n)])
    return problems


def against_oracle(group: Group, got: List[np.ndarray]) -> List[str]:
    """The step against the float64 literal transcription of the update, within ORACLE_TOL."""
    fmt = group.fmt
    p64 = [torch.from_numpy(widen(x, fmt).astype(np.float64)) for x in group.p]
    scale = group.grad_scale or 1.0
    g64 = [torch.from_numpy(widen(y, fmt).astype(np.float64)) / scale for y in group.g]
    mn = [float(v) for v in group.max_norm] if group.p_bound is not None else None
    literal_step(p64, g64, mn, lr=group.lr, p_bound=group.p_bound, maximize=group.maximize,
                 prefactor=group.prefactor)
    atol, rtol = SR_STEP_TOL if fmt.sr else ORACLE_TOL[fmt.torch_dtype]["step"]
    problems = []
    for t, (a, w) in enumerate(zip(got, p64)):
        a = torch.from_numpy(widen(a, fmt).astype(np.float64))
        tol = atol + rtol * (w.abs().max().item() if w.numel() else 0.0)
        err = (a - w).abs().max().item() if w.numel() else 0.0
        if not err <= tol:
            problems.append(f"tensor {t}: {err:.3g} from the float64 oracle (tolerance {tol:.3g})")
    return problems
