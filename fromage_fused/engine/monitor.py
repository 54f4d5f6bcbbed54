"""Per-layer monitoring from the sums a step computes anyway.

With ``monitor=True`` (or ``opt.monitor = True``) a step keeps, for each of its groups, a
:class:`Record`: every pass's per-tensor sums (of whole tensors for DTensor shards), the packed
hyper-parameters it used, its per-tensor scalar state and the loss-scaling flags; references, no
extra pass over the tensors. ``last_stats()`` hands each record to the rule's ``summarize``, which
turns it into per-parameter device tensors on request, with a few vector ops per group and no host
synchronisation. When off: nothing is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

__all__ = ["Record", "record"]


@dataclass
class Record:
    """What a step keeps of one group for its rule's ``summarize``."""

    rule: Any
    params: List[torch.Tensor]
    #: every pass's sums that reduced some, in order
    sums: List[torch.Tensor]
    #: the packed hyper-parameters (a copy: a schedule may change a tensor lr in place afterwards)
    hyper: torch.Tensor
    values: Dict[str, Any]
    #: per-tensor scalar state by name: the parameters' state tensors, as they are after the step
    scalars: Dict[str, List[torch.Tensor]]
    found_inf: Optional[torch.Tensor]
    grad_scale: Optional[torch.Tensor]


def _kept(t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).reshape(()).clone()


def record(call, sums: List[torch.Tensor]) -> Record:
    group = call.group
    device = call.device
    return Record(call.rule, list(group.sources), sums, call.hyper.clone(), dict(call.values),
                  {name: s.entries for name, s in group.scalars.items()},
                  _kept(call.found_inf, device), _kept(call.grad_scale, device))
