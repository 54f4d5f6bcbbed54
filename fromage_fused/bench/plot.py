"""The PNG: per preset, each contender's effective GB/s as a fraction of the measured copy bandwidth."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence


def plot(rows: Sequence[Dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["frac_copy"] is not None]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    fig, axes = plt.subplots(len(presets), 1,
                             figsize=(9, 1.0 + 0.28 * len(contenders) * len(presets) + 0.4 * len(presets)),
                             squeeze=False)
    colors = {c: plt.cm.tab10(i % 10) for i, c in enumerate(contenders)}
    for ax, preset in zip(axes[:, 0], presets):
        mine = {r["contender"]: r for r in ok if r["preset"] == preset}
        names = [c for c in contenders if c in mine]
        values = [mine[c]["frac_copy"] for c in names]
        ax.barh(range(len(names)), values, color=[colors[c] for c in names])
        for i, c in enumerate(names):
            ax.text(values[i], i, f" {mine[c]['median_ms']:.3g} ms", va="center", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", linestyle="--", linewidth=0.8)
        any_row = next((r for r in rows if r["preset"] == preset), {})
        ax.set_title(f"{preset} ({any_row.get('variant')}, {any_row.get('n_params', 0) / 1e6:.1f}M params, "
                     f"{any_row.get('n_tensors')} tensors)", fontsize=9)
        ax.set_xlim(0, max([1.1] + [v * 1.25 for v in values]))
    first = rows[0] if rows else {}
    axes[-1, 0].set_xlabel("effective GB/s / copy GB/s (1.0 = a step at copy speed of its work bytes)")
    fig.suptitle(f"{first.get('device_name', '')} - {first.get('dtype', '')} - torch {first.get('torch', '')}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
