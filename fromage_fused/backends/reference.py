"""The reference backend: each rule's per-tensor loop that reads the step's scalars on the host.

It is the test oracle (run on float64 copies) and the only backend allowed to synchronise; the
rules' code for it is ``rules/<name>/reference.py``.
"""
from __future__ import annotations

from ._base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    syncs = True
    dense_only = False
    kind = "reference"


BACKEND = ReferenceBackend()
