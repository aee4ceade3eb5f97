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
from ..outputs import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

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
        m = [r["attacks"][name] for r in rows if r["set"] == "member" and name in r["attacks"]]
        n = [r["attacks"][name] for r in rows if r["set"] == "non-member" and name in r["attacks"]]
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


def _risk_section(risk: dict | None) -> str:
    """The capacity, the member set's bits, their ratio, and the F1 memk's law predicts beside the measured one."""
    if not risk:
        return ""
    measured = risk["measured_f1"]
    interval = measured.get("interval")
    rows = [["capacity (bits)", _num(risk["capacity_bits"], 0),
             f"{risk['alpha']:g} bits/param x {risk['parameters']:,} parameters; α: {risk['alpha_source']}"],
            ["member set (bits)", _num(risk["member_bits"]), risk["member_bits_source"]],
            ["capacity / member bits", "" if risk["capacity_over_member_bits"] is None
             else f"{risk['capacity_over_member_bits']:,.4g}", ""],
            ["predicted F1", "" if risk["predicted_f1"] is None else f"{risk['predicted_f1']:.3f}",
             f"{risk['f1_law']['form']}, c1 {risk['f1_law']['c1']:.4g}, c2 {risk['f1_law']['c2']:.4g}, "
             f"c3 {risk['f1_law']['c3']:.4g}: {risk['f1_law']['source']}"
             + (" (this ratio is outside the ratios it was fitted on)" if risk["in_fitted_range"] is False else "")],
            ["measured F1", f"{measured['f1']:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""),
             measured["rule"]]]
    return ("<h2>The risk capacity predicts</h2>\n" + _table(["", "value", "from"], rows, "texts")
            + f'<p class="note">The prediction assumes {html.escape(risk.get("prediction_assumes", ""))}. '
            + f'Parameters: {html.escape(risk["parameters_counted"])}.'
            + (f" {html.escape(risk['note'])}." if risk.get("note") else "") + "</p>")


def top_heading(summary: dict, count: int) -> str:
    """The heading of the report's table of top samples, in words."""
    if summary["top_ranked_by"] == "mem_u_bits":
        return f"Top {count} most-memorized samples (unintended memorization, bits)"
    return f"Top {count} samples the model finds likeliest (loss attack: fewest bits per token; no reference)"


def _reference_note(summary: dict) -> str:
    ref = summary["reference"]
    notes = []
    if ref is not None and ref.get("default_reference"):
        notes.append(f"Reference: {ref['spec']}, {ref['default_reference']}.")
    if ref is not None and ref.get("best_of"):
        notes.append(f"With {len(ref['best_of'])} references, each sample is coded by the one that codes it in the "
                     "fewest bits, H(x|R) = min over the references of H(x|R_i) (the paper codes x with whichever "
                     "model compresses it better); the tables give that best reference's figures, and each "
                     "reference's alone below.")
    adapter = summary["model"].get("adapter")
    if adapter:
        notes.append(f"Model M is a {adapter.get('peft_type') or 'PEFT'} adapter on {adapter['base']} (from "
                     f"{adapter['base_given_by']}), merged into it for scoring.")
    return f'<p class="note">{html.escape(" ".join(notes))}</p>' if notes else ""


def _references_section(summary: dict) -> str:
    """Each reference's totals, where there are several."""
    refs = summary.get("references") or []
    if len(refs) < 2:
        return ""
    rows = [[f"R{i + 1} {ref['spec']}", name, _num(r["reference_bits"]), _num(r["unintended_memorization_bits"]),
             _num(r["mean_unintended_memorization_bits"], 2), r["samples_with_unintended_memorization"],
             _num(r["generalization_bits"]), r["best_for_samples"]]
            for i, ref in enumerate(refs) for name, b in summary["sets"].items() for r in [b["references"][i]]]
    return ("<h3>Each reference alone</h3>\n" + _table(
        ["reference", "set", "H(X|R) bits", "mem_U bits", "mem_U per sample", "samples with mem_U > 0",
         "generalization bits", "best reference for (samples)"], rows))


def _extraction_section(summary: dict) -> str:
    """Extraction's rates per prefix length, members against non-members."""
    extraction = summary.get("extraction")
    if not extraction:
        return ""
    from .extraction import extraction_table

    header, rows = extraction_table(summary)
    m, n = extraction["member"], extraction["non-member"]
    return (f"<h2>Extraction: does the model say the text back?</h2>\n{_table(header, rows)}\n"
            f'<p class="note">Given the start token and a text\'s first k tokens, the model decodes greedily (the '
            f"likeliest token each step) up to {extraction['length']} tokens, or to the text's end; a text is "
            f"extracted when the decoding reproduces those tokens exactly. The longest run is the number of leading "
            f"tokens reproduced. Texts of at most k tokens are left out at k. Extracted at one prefix length or more: "
            f"{m['extracted_any']} of {m['samples']} members, {n['extracted_any']} of {n['samples']} non-members.</p>")


def _runs(cells: dict | None) -> str:
    if not cells:
        return ""
    return ", ".join("-" if c is None else f"{c['run']}/{c['continuation']}" for c in cells.values())


def report_html(summary: dict, images: dict[str, bytes]) -> str:
    """One HTML page: models, the coding rule, per-set totals, attacks, plots, the top samples."""
    has_ref = summary["reference"] is not None
    refs = summary.get("references") or ([summary["reference"]] if has_ref else [])
    roles = [("model M", summary["model"]), *((f"reference R{i + 1}" if len(refs) > 1 else "reference R", r)
                                              for i, r in enumerate(refs))]
    models = [[role, m["spec"], m["kind"], f"{m['parameters']:,}", m["context"], m["start_token"], m["dtype"]]
              for role, m in roles]
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
                 *([_runs(t.get("extraction"))] if summary.get("extraction") else []),
                 t["text"][:TEXT_SHOWN] + ("…" if len(t["text"]) > TEXT_SHOWN else "")] for t in summary["top"]]
    top_header = ["set", "index", "mem_U bits", "H(x|M) bits", "H(x|R) bits",
                  *([f"longest run reproduced after k = {', '.join(summary['extraction']['by_prefix'])} tokens"]
                    if summary.get("extraction") else []), "text"]
    pictures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"</figure>" for name, data in images.items())
    n = summary["sets"]["non-member"]["samples"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>memk audit: {html.escape(summary['model']['spec'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 2em; max-width: 1200px; color: #222; }}
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
{_reference_note(summary)}
<h2>Memorization per set</h2>
{_table(set_header, set_rows)}
{_references_section(summary)}
<p class="note">Total memorization takes the uniform code of the text's bytes (8 bits a byte) as H(x);
generalization = total memorization - unintended memorization.</p>
<h2>Membership attacks</h2>
{_table(["attack", "ROC AUC [95% interval]", "TPR at 1% FPR", "TPR at 0.1% FPR"], attack_rows)}
<p class="note">Intervals: percentile bootstrap, {summary['settings']['bootstrap']} resamples. With {n} non-members,
an FPR of 1% allows {int(0.01 * n + 1e-9)} false positives and 0.1% allows {int(0.001 * n + 1e-9)}.</p>
{_risk_section(summary.get("risk"))}
{_extraction_section(summary)}
{pictures}
<h2>{html.escape(top_heading(summary, len(top_rows)))}</h2>
{_table(top_header, top_rows, "texts")}
</body></html>
"""
