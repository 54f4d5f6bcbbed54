"""Rows as data (JSON, CSV) and as the table printed at the end of a run."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

#: Every row has every column (None / empty when it does not apply, e.g. a skipped contender).
COLUMNS = [
    "date", "device", "device_name", "torch", "triton", "cuda", "threads", "dtype",
    "preset", "variant", "n_tensors", "n_params", "param_sets", "fresh_grads", "misalign", "p_bound",
    "contender", "status", "note", "repeats", "median_ms", "q1_ms", "q3_ms", "us_per_tensor",
    "work_bytes_per_param", "traffic_bytes_per_param", "gbps", "traffic_gbps", "copy_gbps", "frac_copy",
    "vs_loop", "vs_foreach", "vs_sgd", "vs_adamw",
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, object]:
    """The columns that say where and when a row was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # absent or broken: the row says so
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} logical CPUs)"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }


def write_json(path: Path, rows: Sequence[Dict], meta: Dict) -> None:
    path.write_text(json.dumps({"meta": meta, "columns": COLUMNS,
                                "rows": [{k: r.get(k) for k in COLUMNS} for r in rows]}, indent=1) + "\n")


def write_csv(path: Path, rows: Sequence[Dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})


def load_json(path: Path) -> tuple:
    data = json.loads(Path(path).read_text())
    return data["rows"], data.get("meta", {})


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: Sequence[Dict], meta: Optional[Dict] = None) -> str:
    """A fixed-width table: one block per preset, a line per contender."""
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"{r0['device_name']} | torch {r0['torch']} | triton {r0['triton']} | CUDA {r0['cuda']} | "
                     f"{r0['dtype']} | {r0['date']}")
    if meta and meta.get("copy_gbps"):
        lines.append(f"copy bandwidth {meta['copy_gbps']:.1f} GB/s ({meta['copy_bytes'] / 2**20:.0f} MiB buffer, read "
                     "+ write)")
    lines.append("ratios: how many times faster than the named contender (> 1 faster); GB/s at each contender's work "
                 "bytes")
    head = (f"{'contender':<20} {'median ms':>10} {'q1-q3 ms':>17} {'us/tensor':>9} {'GB/s':>7} {'x copy':>6} "
            f"{'vs loop':>8} {'vs fe':>7} {'vs SGD':>7} {'vs AdamW':>8}  note")
    preset = None
    for r in rows:
        if r["preset"] != preset:
            preset = r["preset"]
            lines += [
                "", f"{preset} ({r['variant']}): {r['n_params'] / 1e6:.2f}M params in {r['n_tensors']} tensors, "
                f"{r['param_sets']} set(s) rotated{', fresh grads' if r.get('fresh_grads') else ''}"
                f"{', views at element offsets ' + r['misalign'] if (r.get('misalign') or '0,0') != '0,0' else ''}",
                head]
        if r["status"] == "noisy":
            lines.append(f"{r['contender']:<20} {'noisy':>10}  {r['note']}")
            continue
        if r["status"] != "ok":
            lines.append(f"{r['contender']:<20} {'skipped':>10}  {r['note']}")
            continue
        quart = f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}"
        lines.append(
            f"{r['contender']:<20} {r['median_ms']:>10.3f} {quart:>17} {_num(r.get('us_per_tensor'), '.2f'):>9} "
            f"{_num(r['gbps'], '.1f'):>7} {_num(r['frac_copy'], '.2f'):>6} {_num(r['vs_loop'], '.2f'):>8} "
            f"{_num(r['vs_foreach'], '.2f'):>7} {_num(r['vs_sgd'], '.2f'):>7} {_num(r['vs_adamw'], '.2f'):>8}  "
            f"{r['note'] or ''}"
        )
    return "\n".join(lines)


def noise_warning(rows: Sequence[Dict]) -> Optional[str]:
    """What to tell the user when some rows were too noisy to report, else None."""
    noisy = [r for r in rows if r.get("status") == "noisy"]
    if not noisy:
        return None
    return (f"{len(noisy)} of {len(rows)} rows had samples too spread to trust (interquartile range above half "
            "the median): other processes were competing for this machine, so those rows are not results. "
            "Rerun on an idle machine (or only those presets: --presets NAME).")
