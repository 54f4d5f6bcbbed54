"""The throughput benchmark: ``python -m fromage_fused.bench`` (also ``fromage-bench``).

Times one optimizer step per (parameter-shape preset x contender) on one device and reports the
median, quartiles, effective GB/s, fraction of the measured copy bandwidth, and ratios to the
per-tensor loop, the foreach backend, and torch's fused SGD and AdamW.
"""
from .presets import PRESETS
from .runner import Config, run

__all__ = ["PRESETS", "Config", "run"]
