"""What `memk audit` leaves in its output folder besides samples.jsonl: audit.json, roc.png,
memorization.png and report.html, one self-contained page (plots inline as base64 PNG, every
text escaped) that a person can open or send."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .attacks import roc_curve  # noqa: E402
from .outputs import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

SUMMARY = "audit.json"
ROC_PNG = "roc.png"
HISTOGRAM_PNG = "memorization.png"
REPORT = "report.html"
TEXT_SHOWN = 600  # characters of a top sample's text in the report (all of it is in samples.jsonl)


def write_outputs(out: Path, summary: dict, rows: list[dict]) -> None:
    """audit.json, the two PNGs and report.html, each written atomically."""
    atomic_write_json(out / SUMMARY, summary)
    _save(plot_roc(summary, rows), out / ROC_PNG)
    _save(plot_memorization(summary, rows), out / HISTOGRAM_PNG)
    atomic_write_text(out / REPORT, report_html(summary, {name: (out / name).read_bytes()
                                                          for name in (ROC_PNG, HISTOGRAM_PNG)}))


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_roc(summary: dict, rows: list[dict]):
    """Each attack's ROC curve, on linear axes and on log-log axes (where low FPR is seen)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    floor = 1.0 / max(1, summary["sets"]["non-member"]["samples"]) / 2  # where log axes show a rate of 0
    for name, attack in summary["attacks"].items():
        m = [r["attacks"][name] for r in rows if r["set"] == "member"]
        n = [r["attacks"][name] for r in rows if r["set"] == "non-member"]
        fpr, tpr = roc_curve(m, n)
        label = f"{attack['label']} (AUC {attack['auc']:.3f})"
        axes[0].plot(fpr, tpr, label=label, drawstyle="steps-post")
        axes[1].plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=label, drawstyle="steps-post")
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([floor, 1], [floor, 1], color="gray", ls=":", lw=0.8, label="chance")
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        if scale == "log":
            ax.set_xlim(floor, 1.1)
            ax.set_ylim(floor, 1.1)
        ax.set_xlabel("false positive rate (non-members called members)")
        ax.set_ylabel("true positive rate (members found)")
    axes[0].set_title("membership attacks: ROC")
    axes[1].set_title("the same, log-log (low FPR)")
    axes[0].legend(fontsize=7, loc="lower right")
    return fig


def plot_memorization(summary: dict, rows: list[dict]):
    """Histogram of mem_U per sample (members against non-members); without a reference, of H(x | M) per byte."""
    has_ref = summary["reference"] is not None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    value = (lambda r: r["mem_u_bits"]) if has_ref else (lambda r: r["model_bits"] / max(1, r["bytes"]))
    groups = {s: np.array([value(r) for r in rows if r["set"] == s], dtype=float) for s in ("member", "non-member")}
    both = np.concatenate(list(groups.values()))
    bins = np.linspace(both.min(), both.max() if both.max() > both.min() else both.min() + 1, 31)
    for (name, values), color in zip(groups.items(), ("C3", "C0")):
        ax.hist(values, bins=bins, alpha=0.6, color=color, label=f"{name}s ({len(values)})")
    if has_ref:
        ax.set_xlabel("unintended memorization mem_U(x) = max(0, H(x|R) - H(x|M)), bits per sample")
        ax.set_title("how much of each sample the model memorized")
    else:
        ax.set_xlabel("H(x | M), bits per UTF-8 byte")
        ax.set_title("code length per sample (no reference: no mem_U)")
    ax.set_ylabel("samples")
    ax.legend()
    return fig


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(x, digits: int = 1) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _interval(attack: dict, metric: str) -> str:
    lo_hi = attack.get(f"{metric}_interval")
    return f"{attack[metric]:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")


def report_html(summary: dict, images: dict[str, bytes]) -> str:
    """One HTML page: models, the coding rule, per-set totals, attacks, plots, the top samples."""
    has_ref = summary["reference"] is not None
    models = [[role, m["spec"], m["kind"], f"{m['parameters']:,}", m["context"], m["start_token"], m["dtype"]]
              for role, m in (("model M", summary["model"]), ("reference R", summary["reference"])) if m]
    set_rows = []
    for name, b in summary["sets"].items():
        row = [name, b["samples"], f"{b['model_tokens']:,}", _num(b["model_bits"]), _num(b["model_bits_per_byte"], 3)]
        if has_ref:
            row += [_num(b["reference_bits"]), _num(b["unintended_memorization_bits"]),
                    _num(b["mean_unintended_memorization_bits"], 2), b["samples_with_unintended_memorization"],
                    _num(b["generalization_bits"])]
        set_rows.append(row)
    set_header = ["set", "samples", "tokens (M)", "H(X|M) bits", "bits/byte (M)"]
    if has_ref:
        set_header += ["H(X|R) bits", "mem_U bits", "mem_U per sample", "samples with mem_U > 0", "generalization bits"]
    attack_rows = [[a["label"], _interval(a, "auc"), _interval(a, "tpr_at_1pct_fpr"), _interval(a, "tpr_at_0.1pct_fpr")]
                   for a in summary["attacks"].values()]
    top_rows = [[t["set"], t["index"], _num(t["mem_u_bits"]), _num(t["model_bits"]), _num(t["reference_bits"]),
                 t["text"][:TEXT_SHOWN] + ("…" if len(t["text"]) > TEXT_SHOWN else "")] for t in summary["top"]]
    pictures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"</figure>" for name, data in images.items())
    n = summary["sets"]["non-member"]["samples"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>memk audit: {html.escape(summary['model']['spec'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }}
th {{ background: #f2f2f2; }} td:first-child, th:first-child {{ text-align: left; }}
table.texts td:last-child {{ text-align: left; white-space: pre-wrap; font-family: monospace; max-width: 640px; }}
img {{ max-width: 100%; }} .note {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>memk audit</h1>
<p class="note">{html.escape(summary['created'])}. Bits are code lengths, -log2 p, summed over the tokens of each text;
unintended memorization (Morris et al. 2025) is mem_U(x) = max(0, H(x|R) - H(x|M)).
Coding: {html.escape(summary['coding'])}.</p>
<h2>Models</h2>
{_table(["role", "model", "kind", "parameters", "context", "start token", "dtype"], models)}
<h2>Memorization per set</h2>
{_table(set_header, set_rows)}
<p class="note">Total memorization takes the uniform code of the text's bytes (8 bits a byte) as H(x);
generalization = total memorization - unintended memorization.</p>
<h2>Membership attacks</h2>
{_table(["attack", "ROC AUC [95% interval]", "TPR at 1% FPR", "TPR at 0.1% FPR"], attack_rows)}
<p class="note">Intervals: percentile bootstrap, {summary['settings']['bootstrap']} resamples. With {n} non-members,
an FPR of 1% allows {int(0.01 * n + 1e-9)} false positives and 0.1% allows {int(0.001 * n + 1e-9)}.</p>
{pictures}
<h2>Top {len(top_rows)} samples by {html.escape(summary['top_ranked_by'])}</h2>
{_table(["set", "index", "mem_U bits", "H(x|M) bits", "H(x|R) bits", "text"], top_rows, "texts")}
</body></html>
"""
