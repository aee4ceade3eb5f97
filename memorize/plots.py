"""The two capacity plots, as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_capacity_curves(summary: dict, path: Path) -> None:
    """Memorized bits against dataset size (bits), one line per model, capacity marked."""
    blocks = summary["precisions"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(6.5 * len(blocks), 4.8), squeeze=False)
    for ax, (precision, block) in zip(axes[0], blocks.items()):
        largest = 1.0
        for i, m in enumerate(block["models"]):
            color = f"C{i}"
            x = [p["dataset_bits"] for p in m["points"]]
            y = [p["memorized_bits"] for p in m["points"]]
            largest = max(largest, *x)
            ax.plot(x, y, "o-", color=color, label=f"{m['model_name']} ({m['parameters']:,} params)")
            ax.axhline(m["capacity_bits"], color=color, ls="--", lw=0.8)
        line = np.geomspace(min(p["dataset_bits"] for m in block["models"] for p in m["points"]), largest, 50)
        ax.plot(line, line, color="gray", lw=0.8, ls=":", label="all data memorized")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dataset size (bits)")
        ax.set_ylabel("memorized bits")
        ax.set_title(f"memorization vs dataset size ({precision}); dashed: capacity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_capacity_vs_params(summary: dict, path: Path) -> None:
    """Capacity against parameter count, with the fitted α and the paper's 3.6 bits/param."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    top = 1.0
    for i, (precision, block) in enumerate(summary["precisions"].items()):
        p = np.array([m["parameters"] for m in block["models"]], dtype=float)
        c = np.array([m["capacity_bits"] for m in block["models"]], dtype=float)
        top = max(top, p.max())
        alpha = block["fit"]["through_origin"]["alpha"]
        ax.plot(p, c, "o", color=f"C{i}", label=f"{precision} runs")
        xs = np.linspace(0, p.max() * 1.05, 50)
        ax.plot(xs, alpha * xs, "-", color=f"C{i}", label=f"{precision} fit: α = {alpha:.2f} bits/param")
    xs = np.linspace(0, top * 1.05, 50)
    ax.plot(xs, summary["paper_alpha"] * xs, "k--", lw=0.8, label=f"paper: {summary['paper_alpha']} bits/param")
    ax.set_xlabel("parameters")
    ax.set_ylabel("capacity (bits)")
    ax.set_title("capacity against model size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
