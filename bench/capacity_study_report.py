"""Plots and tables of the capacity study from its committed result files (bench/capacity_study.py).

    python -m memk.bench.capacity_study_report [--results bench/results/capacity-study] [--out docs/capacity-study]

Writes recipe.png, budget.png, paper-1x32.png, precision.png (memorized bits per parameter
against steps, log axis, one line per run), shape.png (bits per parameter against the share of
parameters in the token embedding) and tables.md (every arm's row, the counting table, the
arms unfinished when collected), and rewrites the <!-- table:NAME --> blocks of
docs/capacity-study.md from those tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from memk.memorize.schedule import SATURATED_BELOW, doubling_gain


def load(results: Path) -> dict[str, dict]:
    """The finished arms' records, by arm."""
    return {f.stem: json.loads(f.read_text()) for f in sorted(results.glob("*.json"))
            if not f.name.endswith(".unfinished.json")}


def load_unfinished(results: Path) -> dict[str, dict]:
    """The records of arms still training when collected: their curves so far."""
    return {f.name.removesuffix(".unfinished.json"): json.loads(f.read_text())
            for f in sorted(results.glob("*.unfinished.json"))}


def curve_entries(records: dict[str, dict], unfinished: dict[str, dict], prefix: str) -> list[tuple[str, list, int]]:
    """(label, curve, parameters) of every run of the arms named prefix*, finished or not."""
    from memk.memorize.model import GPTConfig, count_parameters

    out = []
    for arm, record in records.items():
        if arm.startswith(prefix):
            out += [(f"{arm} (N {r['n_sequences']})", [tuple(p) for p in r["bits_curve"]], r["parameters"])
                    for r in record["rows"]]
    for arm, record in unfinished.items():
        if arm.startswith(prefix):
            parameters = count_parameters(GPTConfig(**record["experiment"]["models"][0]))
            out += [(f"{arm} (unfinished, step {r['step']:,})", [tuple(p) for p in r["bits_curve"]], parameters)
                    for r in record["runs_in_progress"]]
    return out


def plot_curves(path: Path, entries: list[tuple[str, list, int]], title: str, best_so_far: bool = True) -> None:
    """Memorized bits per parameter against steps, on a log axis: the best so far (what a run
    reports), or each evaluation's own (where a curve falls back)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, curve, parameters) in enumerate(entries):
        steps, best, running = [], [], 0.0
        for step, bits in curve:
            running = max(running, bits) if best_so_far else bits
            if step > 0:
                steps.append(step)
                best.append(running / parameters)
        ax.plot(steps, best, label=label, lw=1.2, ls=("-", "--", ":")[i // 10 % 3])  # ten colours, then dashes
    ax.set_xscale("log")
    ax.set_xlabel("training steps (log)")
    ax.set_ylabel("memorized bits per parameter" + (" (best so far)" if best_so_far else " (each evaluation)"))
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def row_facts(record: dict) -> list[dict]:
    """One line per run: what was trained, the bits per parameter at the best evaluation, the gain
    over the last doubling of steps before the cool-down, the bits at step marks."""
    out = []
    for r in record["rows"]:
        cfg = r["train_config"]
        curve = [tuple(p) for p in r["bits_curve"]]
        stable_end = cfg["max_steps"] - cfg["cooldown_steps"] if r["stop_reason"] == "step_cap" else None
        m = r["model"]
        out.append({
            "arm": record["arm"], "question": record["question"], "model": f"{m['n_layer']}x{m['d_model']}",
            "V": m["vocab_size"], "S": m["seq_len"], "parameters": r["parameters"],
            "embedding_share": m["vocab_size"] * m["d_model"] / r["parameters"],
            "n": r["n_sequences"], "precision": r["precision"], "steps": r["steps"],
            "alpha": r["memorized_bits"] / r["parameters"], "bits": r["memorized_bits"],
            "fraction": r["fraction_memorized"], "gain": doubling_gain(curve, until=stable_end),
            "seconds": r["train_seconds"], "curve": curve, "lr": cfg["lr"], "batch": cfg["batch_size"],
            "cpu": record["finished"]["cpu"], "date": record["finished"]["date"][:10],
            "load": record["started"]["load_average"][0],
        })
    return out


def table(rows: list[dict]) -> str:
    lines = ["| arm | model | V | S | params | N | precision | steps | bits/param | last doubling | CPU, date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "n/a" if r["gain"] is None else f"+{r['gain']:.1%}" + ("" if r["gain"] < SATURATED_BELOW else " (lower bound)")
        lines.append(f"| {r['arm']} | {r['model']} | {r['V']} | {r['S']} | {r['parameters']:,} | {r['n']} | {r['precision']} "
                     f"| {r['steps']:,} | {r['alpha']:.2f} | {gain} | {r['cpu']}, {r['date']} |")
    return "\n".join(lines)


def parameter_conventions(m: dict) -> dict[str, int]:
    """A model's parameters counted the ways a paper might: memk's (every trainable parameter, the
    tied embedding once), without the positions, without LayerNorms and biases, with an untied
    output head, and the matrices of the blocks alone."""
    d, V, S, L = m["d_model"], m["vocab_size"], m["seq_len"], m["n_layer"]
    matrices = L * 12 * d * d
    norms_and_biases = L * (4 * d + 3 * d + d + 4 * d + d) + 2 * d
    every = V * d + S * d + matrices + norms_and_biases
    return {"memk (all, tied once)": every, "without positions": every - S * d,
            "without LayerNorms and biases": every - norms_and_biases, "untied head": every + V * d,
            "block matrices only": matrices}


def counting_table(summary: dict) -> str:
    """α of a run-capacity summary under each convention, against the paper's 3.6."""
    models = summary["precisions"]["float32"]["models"]
    names = list(parameter_conventions(models[0]["model"]))
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in models:
        counts = parameter_conventions(m["model"])
        assert counts["memk (all, tied once)"] == m["parameters"], "the convention table must count memk's way first"
        cells = [f"{m['capacity_bits'] / counts[n]:.2f} ({counts[n]:,})" for n in names]
        lines.append(f"| {m['model_name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fill_tables(doc: Path, tables: str) -> None:
    """Rewrite each <!-- table:NAME --> ... <!-- /table:NAME --> block of doc with the section of
    the tables whose title starts with NAME: the page quotes the result files, never a copy by hand."""
    import re

    sections = {m.group(1): m.group(2).strip()
                for m in re.finditer(r"^## ([^\n]+)\n\n(.*?)(?=^## |\Z)", tables, re.S | re.M)}

    def block(match: re.Match) -> str:
        name = match.group(1)
        body = next((v for k, v in sections.items() if k.startswith(name)), "(not measured)")
        return f"<!-- table:{name} -->\n{body}\n<!-- /table:{name} -->"

    doc.write_text(re.sub(r"<!-- table:(\w+) -->.*?<!-- /table:\1 -->", block, doc.read_text(), flags=re.S))


@click.command()
@click.option("--results", default="bench/results/capacity-study", show_default=True)
@click.option("--out", default="docs/capacity-study", show_default=True)
@click.option("--default-summary", default="docs/default-run/summary.json", show_default=True,
              help="a run-capacity summary whose α the counting table recomputes")
@click.option("--doc", default="docs/capacity-study.md", show_default=True,
              help="the page whose <!-- table:NAME --> blocks are rewritten from the tables")
def main(results: str, out: str, default_summary: str, doc: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load(Path(results))
    rows = [row for record in records.values() for row in row_facts(record)]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    groups = {"recipe": [r for r in rows if r["arm"].startswith("recipe-")],
              "shape": [r for r in rows if r["arm"].startswith("shape-")],
              "precision": [r for r in rows if r["arm"].startswith("precision-")],
              "paper": [r for r in rows if r["arm"].startswith("paper1x32-") and "probe" not in r["arm"]],
              "probe": [r for r in rows if "probe" in r["arm"]]}
    text = ["# The capacity study's tables", "",
            f"Written by `python -m memk.bench.capacity_study_report` from {results}/ (one file per arm).", ""]
    for name, group in groups.items():
        if group:
            text += [f"## {name}", "", table(group), ""]
    text += [f"## counting ({default_summary}: bits/param (parameters))", "",
             counting_table(json.loads(Path(default_summary).read_text())), ""]
    unfinished_arms = load_unfinished(Path(results))
    if unfinished_arms:
        text += ["## unfinished when collected", "", "| arm | step reached | best bits/param so far |", "|---|---|---|"]
        for label, curve, parameters in curve_entries({}, unfinished_arms, ""):
            text.append(f"| {label} | {curve[-1][0]:,} | {max(b for _, b in curve) / parameters:.2f} |")
        text.append("")
    (folder / "tables.md").write_text("\n".join(text))
    print("\n".join(text))
    if Path(doc).exists():
        fill_tables(Path(doc), "\n".join(text))

    unfinished = load_unfinished(Path(results))
    for name, prefix, title in (("recipe", "recipe-", "1x8 at V 64, S 32 (1,656 parameters): recipes, 20,000 steps"),
                                ("budget", "budget-", "1x8 at V 2048, S 64 (17,784 parameters), batch 16: constant rate "
                                                      "against a whole-run decay"),
                                ("paper-1x32", "paper1x32-", "the paper's 1x32 at V 2048, S 64 (80,352 parameters)"),
                                ("precision", "precision-", "precision on the default's models (V 64, S 32)")):
        entries = curve_entries(records, unfinished, prefix)
        if entries:
            plot_curves(folder / f"{name}.png", entries, title, best_so_far=name != "budget")

    shape = groups["shape"] + [r for r in groups["paper"] if r["precision"] == "float32"]
    if shape:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in shape:
            ax.scatter(r["embedding_share"], r["alpha"], color=f"C{[64, 256, 2048].index(r['V'])}")
            ax.annotate(f"{r['model']} S{r['S']}", (r["embedding_share"], r["alpha"]), fontsize=7)
        for i, v in enumerate((64, 256, 2048)):
            ax.scatter([], [], color=f"C{i}", label=f"V {v}")
        ax.axhline(3.83, ls="--", color="gray", label="paper, float32 mean (3.83)")
        ax.set_xlabel("share of parameters in the token embedding (V·d / parameters)")
        ax.set_ylabel("memorized bits per parameter")
        ax.set_title("bits per parameter against shape (float32, lr 1e-2; 10,000 steps, the 1x32 S64 points 20,000-30,000)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "shape.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
