"""The science stage's figure: α (bits per parameter) per precision from a capacity run's folder,
and the bfloat16/float32 ratio next to the paper's."""

from __future__ import annotations

import json
import os

import click


def science_alpha(run_dir: str) -> dict:
    """α per precision (through the origin), the bfloat16/float32 ratio and the paper's, from a
    run-capacity folder: its summary.json, or, where the run was stopped before writing it, its
    finished runs (runs.jsonl)."""
    from memk.memorize.experiments import capacity
    from memk.memorize.constants import PAPER_ALPHA_BY_PRECISION

    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        source = "summary.json"
    else:
        rows_path = os.path.join(run_dir, "runs.jsonl")
        rows = []
        if os.path.exists(rows_path):
            with open(rows_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise click.ClickException(f"{run_dir} holds no finished run (no summary.json, no rows in runs.jsonl)")
        summary = capacity.summarize(rows)
        source = f"runs.jsonl ({len(rows)} finished runs; the run was stopped before its summary)"
    alpha = {p: block["fit"]["through_origin"]["alpha"] for p, block in summary["precisions"].items()}
    out = {
        "source": source,
        "alpha": alpha,
        "models": {p: [{k: m[k] for k in ("model_name", "parameters", "capacity_bits", "bits_per_parameter", "plateau_seen")}
                       for m in block["models"]] for p, block in summary["precisions"].items()},
        "paper_alpha": dict(PAPER_ALPHA_BY_PRECISION),
        "paper_ratio": PAPER_ALPHA_BY_PRECISION["bfloat16"] / PAPER_ALPHA_BY_PRECISION["float32"],
        "ratio": alpha["bfloat16"] / alpha["float32"] if "bfloat16" in alpha and "float32" in alpha else None,
    }
    return out


def format_science(result: dict) -> str:
    lines = [f"α through the origin (bits/parameter), from {result['source']}:"]
    for precision, a in sorted(result["alpha"].items()):
        models = result["models"][precision]
        lines.append(f"  {precision}: {a:.3f} over {len(models)} models "
                     f"({sum(m['plateau_seen'] for m in models)} with the plateau seen); "
                     f"paper {result['paper_alpha'].get(precision, '–')}")
    ratio = result["ratio"]
    lines.append(f"  bfloat16/float32: {ratio:.3f}" if ratio is not None else "  bfloat16/float32: needs both precisions")
    lines.append(f"  paper: {result['paper_alpha']['bfloat16']} / {result['paper_alpha']['float32']} = {result['paper_ratio']:.3f}")
    return "\n".join(lines)
