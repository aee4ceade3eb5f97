"""Plots and tables of the capacity study from its committed result files (bench/capacity_study.py).

    python -m memk.bench.capacity_study_report [--results bench/results/capacity-study] [--out docs/capacity-study]

Writes recipe.png (memorized bits per parameter against steps, log axis, one line per recipe),
shape.png (bits per parameter against the share of parameters in the token embedding) and
paper-1x32.png (the paper's 1x32 point, float32 and bfloat16), and prints the tables
docs/capacity-study.md quotes, each row from one result file.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from memk.memorize.schedule import SATURATED_BELOW, doubling_gain


def load(results: Path) -> dict[str, dict]:
    return {f.stem: json.loads(f.read_text()) for f in sorted(results.glob("*.json"))}


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


@click.command()
@click.option("--results", default="bench/results/capacity-study", show_default=True)
@click.option("--out", default="docs/capacity-study", show_default=True)
def main(results: str, out: str) -> None:
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
    for name, group in groups.items():
        if group:
            print(f"## {name}\n\n{table(group)}\n")

    for name, group, title in (("recipe", groups["recipe"], "1x8 at V 64, S 32 (1,656 parameters): recipes"),
                               ("paper-1x32", groups["paper"] + groups["probe"], "the paper's 1x32 at V 2048, S 64")):
        if not group:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in group:
            steps = [s for s, _ in r["curve"] if s > 0]
            best, running = [], 0.0
            for s, b in r["curve"]:
                running = max(running, b)
                if s > 0:
                    best.append(running / r["parameters"])
            ax.plot(steps, best, label=f"{r['arm']} (N {r['n']})")
        ax.set_xscale("log")
        ax.set_xlabel("training steps (log)")
        ax.set_ylabel("memorized bits per parameter (best so far)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=110)
        plt.close(fig)

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
        ax.set_title("bits per parameter against shape (float32, memk's recipe)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "shape.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
