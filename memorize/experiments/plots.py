"""The experiments' plots, as PNG files: capacity (run-capacity) and generalization (run-generalization)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..schedule import saturated  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_capacity_curves(summary: dict, path: Path) -> None:
    """Memorized bits against dataset size (bits), one line per model, capacity marked; the runs
    not trained to saturation (a doubling of their steps still gained bits: a lower bound) drawn hollow."""
    blocks = summary["precisions"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(6.5 * len(blocks), 4.8), squeeze=False)
    for ax, (precision, block) in zip(axes[0], blocks.items()):
        largest = 1.0
        capped_shown = False
        for i, m in enumerate(block["models"]):
            color = f"C{i}"
            x = [p["dataset_bits"] for p in m["points"]]
            y = [p["memorized_bits"] for p in m["points"]]
            largest = max(largest, *x)
            ax.plot(x, y, "o-", color=color, label=f"{m['model_name']} ({m['parameters']:,} params)")
            capped = [(px, py) for px, py, p in zip(x, y, m["points"]) if not saturated(p.get("saturation_gain"))]  # as the table judges
            if capped:
                ax.plot(*zip(*capped), "o", color="white", markeredgecolor=color, markersize=7, zorder=3,
                        label=None if capped_shown else "not saturated (a lower bound)")
                capped_shown = True
            ax.axhline(m["capacity_bits"], color=color, ls="--", lw=0.8)
        line = np.geomspace(min(p["dataset_bits"] for m in block["models"] for p in m["points"]), largest, 50)
        ax.plot(line, line, color="gray", lw=0.8, ls=":", label="all data memorized")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dataset size (bits)")
        ax.set_ylabel("memorized bits")
        ax.set_title(f"memorization vs dataset size ({precision}); dashed: capacity")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_capacity_vs_params(summary: dict, path: Path) -> None:
    """Capacity against parameter count: the fitted α with its confidence band, and the paper's α."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    top = 1.0
    for i, (precision, block) in enumerate(summary["precisions"].items()):
        p = np.array([m["parameters"] for m in block["models"]], dtype=float)
        c = np.array([m["capacity_bits"] for m in block["models"]], dtype=float)
        top = max(top, p.max())
        fit = block["fit"]["through_origin"]
        alpha = fit["alpha"]
        lower = np.array([not m.get("saturated", False) for m in block["models"]])
        ax.plot(p[~lower], c[~lower], "o", color=f"C{i}", label=f"{precision}: saturated")
        if lower.any():
            ax.plot(p[lower], c[lower], "o", color="white", markeredgecolor=f"C{i}",
                    label=f"{precision}: not saturated (a lower bound)")
        xs = np.linspace(0, p.max() * 1.05, 50)
        ax.plot(xs, alpha * xs, "-", color=f"C{i}", label=f"{precision} fit: α = {alpha:.2f} bits/param")
        if fit.get("ci"):  # the slope's interval, drawn as the band of lines it allows
            low, high = fit["ci"]
            level = int(100 * block["fit"]["confidence"])
            ax.fill_between(xs, low * xs, high * xs, color=f"C{i}", alpha=0.15,
                            label=f"{precision} {level}% interval: [{low:.2f}, {high:.2f}]")
    xs = np.linspace(0, top * 1.05, 50)
    ax.plot(xs, summary["paper_alpha"] * xs, "k--", lw=0.8, label=f"paper: {summary['paper_alpha']} bits/param")
    ax.set_xlabel("parameters")
    ax.set_ylabel("capacity (bits)")
    ax.set_title("capacity against model size")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_generalization(summary: dict, out_dir: Path) -> list[Path]:
    """The generalization experiment's plots; returns the files written."""
    plots = {"memorization.png": _plot_memorization, "double_descent.png": _plot_double_descent,
             "membership.png": _plot_membership}
    if "reference_check" in summary:  # the Markov source: the reference model against the exact generator
        plots["reference_check.png"] = _plot_reference_check
    paths = []
    for name, plot in plots.items():
        paths.append(Path(out_dir) / name)
        plot(summary, paths[-1])
    return paths


def _ratio_axis(ax, values) -> None:
    """A log axis for ratios, ticked at powers of two and labelled plainly (0.25, 1, 4)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, FormatStrFormatter

    ax.set_xscale("log")
    lo, hi = min(values), max(values)
    ticks = [2.0**k for k in range(-10, 11) if lo / 1.5 <= 2.0**k <= hi * 1.5]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _all_ratios(summary: dict, key: str = "dataset_over_capacity") -> list[float]:
    return [p[key] for m in summary["models"] for p in m["points"]]


def _series(model: dict, key: str):
    return [p["dataset_over_capacity"] for p in model["points"]], [p[key] for p in model["points"]]


def _plot_memorization(summary: dict, path: Path) -> None:
    """Unintended memorization and generalization against dataset size / capacity."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, m in enumerate(summary["models"]):
        style = "o-" if m["role"] == "sweep" else "s--"
        for ax, key in zip(axes, ("unintended_bits", "generalization_bits")):
            x, y = _series(m, key)
            ax.plot(x, y, style, color=f"C{i}", label=f"{m['model_name']} ({m['parameters']:,} params)")
    for ax, title in zip(axes, ("unintended memorization Σ max(0, H(x|θ) - H(x|θ̂))", "generalization: total - unintended")):
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        _ratio_axis(ax, _all_ratios(summary))
        ax.set_xlabel("dataset size / capacity (bits)")
        ax.set_ylabel("bits")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    _save(fig, path)


def _plot_double_descent(summary: dict, path: Path) -> None:
    """Train (dashed) and held-out (solid) loss against dataset size / capacity, peak marked."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, m in enumerate(summary["models"]):
        x, held = _series(m, "heldout_bits_per_token")
        _, train = _series(m, "train_bits_per_token")
        ax.plot(x, held, "o-", color=f"C{i}", label=f"{m['model_name']} held-out")
        ax.plot(x, train, ".--", color=f"C{i}", lw=0.8, label=f"{m['model_name']} train")
        ax.plot([m["heldout_peak_dataset_over_capacity"]], [m["heldout_peak_bits_per_token"]], "*", ms=12, color=f"C{i}")
    ax.axvline(1.0, color="gray", lw=0.8, ls=":", label="dataset bits = capacity")
    _ratio_axis(ax, _all_ratios(summary))
    ax.set_yscale("log")
    ax.set_xlabel("dataset size / capacity (bits)")
    ax.set_ylabel("loss (bits per coded token)")
    ax.set_title("double descent: held-out loss against dataset size / capacity; ★ peak")
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_membership(summary: dict, path: Path) -> None:
    """Attack F1 and AUC against capacity / dataset size, the fitted law and its predictions."""
    from ..membership import f1_law

    fig, ax = plt.subplots(figsize=(7, 4.8))
    ratios = []
    for i, m in enumerate(summary["models"]):
        x = [p["capacity_over_dataset"] for p in m["points"]]
        ratios += x
        sweep = m["role"] == "sweep"
        ax.plot(x, [p["f1"] for p in m["points"]], "o" if sweep else "s", color=f"C{i}",
                label=f"{m['model_name']} F1{'' if sweep else ' (check run)'}")
        ax.plot(x, [p["auc"] for p in m["points"]], "x", color=f"C{i}", alpha=0.6)
    law = summary.get("f1_law")
    if law is not None and ratios:
        xs = np.geomspace(min(ratios) / 1.5, max(ratios) * 1.5, 200)
        ax.plot(xs, f1_law(xs, law["c1"], law["c2"], law["c3"]), "k-", lw=1,
                label=f"fit: c1={law['c1']:.2f}, c2={law['c2']:.3f}, c3={law['c3']:.2f}")
    for c in summary.get("prediction_check", {}).get("checks", []):
        if c["predicted_f1"] is not None:
            ax.plot([c["capacity_over_dataset"]], [c["predicted_f1"]], "k^", mfc="none", ms=9)
    ax.plot([], [], "k^", mfc="none", label="predicted before the check run")
    ax.plot([], [], "kx", label="ROC AUC")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    _ratio_axis(ax, _all_ratios(summary, "capacity_over_dataset"))
    ax.set_xlabel("capacity / dataset size (bits)")
    ax.set_ylabel("membership inference F1 (AUC: x)")
    ax.set_title("loss-threshold membership inference")
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_reference_check(summary: dict, path: Path) -> None:
    """Unintended memorization from the reference model against the exact one (Markov source)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 1.0
    for i, m in enumerate(summary["models"]):
        x = [p["unintended_exact_bits"] for p in m["points"]]
        y = [p["unintended_reference_bits"] for p in m["points"]]
        top = max(top, *x, *y)
        ax.plot(x, y, "o", color=f"C{i}", label=m["model_name"])
    ax.plot([0, top], [0, top], "k:", lw=0.8, label="estimate = exact")
    ax.set_xlabel("mem_U with the exact generator θ (bits)")
    ax.set_ylabel("mem_U with the reference model (bits)")
    rc = summary["reference_check"]
    off = rc["relative_error_of_total"]
    gap = f"{100 * off:+.1f}%" if off is not None else f"{rc['total_unintended_reference_bits']:,.0f} bits against 0"
    ax.set_title(f"reference-model estimate of total mem_U: {gap}", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
