"""Figure 1 of Apprentice (Mishra & Marr 2018) for any model: weights vs activations.

One group of bars per precision, one bar per batch size; each bar stacks the weights (bottom)
and the summed activations (top), with the peak live activations marked on it.
"""

from __future__ import annotations

from pathlib import Path

from .._io import atomic_write
from ._report import Footprint


def plot(reports: dict[str, Footprint], path: str | Path) -> Path:
    """Write the figure for ``{label: footprint}`` to ``path`` (png/pdf/svg by suffix)."""
    from matplotlib.figure import Figure  # no pyplot: no backend chosen, no global state

    labels = list(reports)
    batches = next(iter(reports.values())).batch_sizes
    width = 0.8 / len(batches)
    fig = Figure(figsize=(1.6 + 1.4 * len(labels) * max(1, len(batches) / 2), 4.2))
    ax = fig.subplots()
    mib = 2.0**20
    for j, b in enumerate(batches):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        w = [reports[k].weight_bytes / mib for k in labels]
        a = [reports[k].activation_bytes(b) / mib for k in labels]
        peak = [reports[k].peak_activation_bytes(b) / mib for k in labels]
        ax.bar(xs, w, width * 0.9, color="#4C72B0", label="weights" if j == 0 else None)
        ax.bar(xs, a, width * 0.9, bottom=w, color=_shade(j, len(batches)),
               label=f"activations, batch {b}")
        ax.scatter(xs, [wi + p for wi, p in zip(w, peak, strict=True)], marker="_", s=120,
                   color="black", label="weights + peak live activations" if j == 0 else None,
                   zorder=3)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("memory (MiB)")
    ax.set_title(f"Inference memory footprint: {next(iter(reports.values())).source}",
                 fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda p: fig.savefig(p, dpi=150, format=fmt))


def _shade(j: int, n: int) -> tuple[float, float, float]:
    """Oranges from light (small batch) to dark (large batch)."""
    t = j / max(1, n - 1)
    return (1.0 - 0.25 * t, 0.75 - 0.45 * t, 0.45 - 0.4 * t)
