"""Regenerate the benchmarks page's results section and the PNG plots from bench/results/*.json.

    python -m memk.bench.report [--results bench/results] [--doc docs/benchmarks.md]

Only the text between `<!-- bench:start -->` and `<!-- bench:end -->` in the page is
rewritten. Every number comes from a committed JSON file; each row names its device,
versions and date. The section is also written to bench/results/SUMMARY.md, its links
relative to that file.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import defaultdict

import click

from .common import format_bytes, format_rate, format_time

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def load_reports(results_dir: str) -> list[tuple[str, dict]]:
    reports = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and str(data.get("schema", "")).startswith("memk-bench/"):
            reports.append((path, data))
    return reports


def slug(report: dict) -> str:
    env = report["env"]
    name = env["device_name"] if env["device_type"] == "cuda" else f"cpu-{env.get('cpu_count', '')}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---- plots --------------------------------------------------------------------------------


def _series(report: dict, suite: str):
    """{family: {variant: [(size, throughput)]}} of the ok results of a suite, and each family's
    (swept axis, throughput unit): a suite's families may sweep different things (train: model
    size in parameters, or ensemble members)."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    axes: dict[str, tuple[str, str]] = {}
    for r in report["results"]:
        if r["suite"] == suite and r["status"] == "ok":
            out[r["family"]][r["variant"]].append((r["sweep"]["value"], r["throughput"]["value"]))
            axes[r["family"]] = (r["sweep"]["axis"], r["throughput"]["unit"])
    return out, axes


def plot_suite(report: dict, suite: str, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, family_axes = _series(report, suite)
    families = [f for f, v in series.items() if any(len(p) > 1 for p in v.values())]
    if not families:
        return None
    cols = min(3, len(families))
    rows = -(-len(families) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, family in zip(axes.flat, families):
        xlabel, unit = family_axes[family]
        for variant, points in sorted(series[family].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linestyle="-" if variant.startswith("memk") or "fused" in variant or "triton" in variant else "--",
                    label=variant)
        ax.set_xscale("log", base=10 if xlabel == "params" else 2)
        ax.set_yscale("log")
        ax.set_title(family, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    env = report["env"]
    fig.suptitle(f"memk bench {suite}: {env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}, "
                 f"{env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the headline table -------------------------------------------------------------------


def _headline_groups(results: list[dict]) -> list[str]:
    """The keys of the groups the page shows: per family one representative size, except the
    attention suite, which shows every sequence length of its D64 families and nothing else."""
    by_family: dict[tuple[str, str], set] = defaultdict(set)
    measured: dict[tuple[str, str], set] = defaultdict(set)
    for r in results:
        by_family[(r["suite"], r["family"])].add(r["sweep"]["value"])
        if r["status"] == "ok":
            measured[(r["suite"], r["family"])].add(r["sweep"]["value"])
    chosen = []
    for (suite, family), sizes in by_family.items():
        sizes = sorted(sizes)
        if suite == "logprob":
            size = 16384 if 16384 in sizes else sizes[-1]
        elif suite == "attention":
            if " D32 " in family or " D128 " in family:  # D64 stands for the head sizes on the page
                continue
            for size in sizes:
                chosen.append((suite, family, size))
            continue
        else:  # the largest size measured (a larger one skipped for memory says less), else the largest
            size = max(measured[(suite, family)] or sizes)
        chosen.append((suite, family, size))
    keys = []
    for _suite, family, size in chosen:
        key = next(r["group"] for r in results if r["family"] == family and r["sweep"]["value"] == size)
        keys.append(key)
    return keys


def isa_summary(flags: list[str] | None) -> str:
    """The vector units of a CPU in a few words ("; AVX-512 with bf16, AMX"), from its ISA flags; "" if unknown."""
    if not flags:
        return ""
    if "avx512f" in flags:
        parts = ["AVX-512" + (" with bf16" if "avx512_bf16" in flags else "")]
    elif "avx2" in flags:
        parts = ["AVX2"]
    else:
        parts = ["no AVX2"]
    if "amx_tile" in flags:
        parts.append("AMX")
    return "; " + ", ".join(parts)


def headline_rows(path: str, report: dict) -> list[list[str]]:
    results = report["results"]
    env = report["env"]
    device = (f"{env['device_name']} ({env['torch_threads']} threads{isa_summary(env.get('cpu_isa_flags'))})"
              if env["device_type"] == "cpu" else env["device_name"])
    versions = f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda'] or '–'}"
    rows, seen_skips = [], set()
    for key in _headline_groups(results):
        group = [r for r in results if r["group"] == key]
        ok_baselines = [r for r in group if r["status"] == "ok" and not r["compare_to"]]
        best = min(ok_baselines, key=lambda r: r["time"]["median_s"], default=None)
        shown = [r for r in group if r["compare_to"] or r is best]
        for r in shown:
            if r["status"] == "ok":
                ratios = ", ".join(f"**{x:.2f}×** vs {name}" for name, x in r["ratios"].items()) or "baseline"
                if r.get("fraction_of_floor"):
                    ratios += f"; {r['fraction_of_floor']:.2f}× its floor ({r['floor']['bound']})"
                cells = [format_time(r["time"]["median_s"]), format_rate(r["throughput"]["value"], r["throughput"]["unit"]),
                         ratios, format_bytes(r["memory"]["peak_bytes"])]
                if r["mfu"]:
                    cells[1] += f", {r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']['value']:.1f}% ({r['mfu']['peak_source']})"
            else:
                if (r["suite"], r["variant"], r["reason"]) in seen_skips:
                    continue  # one line per reason is enough
                seen_skips.add((r["suite"], r["variant"], r["reason"]))
                reason = (r["reason"] or "").replace("|", "/")
                cells = [r["status"], "", reason[:90] + ("…" if len(reason) > 90 else ""), ""]
            size = r["params"].get("name") or f"{r['sweep']['axis']} {r['sweep']['value']}"
            rows.append([r["suite"], f"{r['family']}, {size}", r["variant"], *cells,
                         device, versions, r["date"][:10], f"[json]({os.path.relpath(path)})"])
    return rows


def render_section(reports: list[tuple[str, dict]], plots: list[str], doc_dir: str, results_dir: str) -> str:
    """The section, its links relative to doc_dir (the current directory while it runs)."""
    results_link = os.path.relpath(results_dir, doc_dir).replace(os.sep, "/").rstrip("/") + "/"
    lines = [
        "",
        f"Generated by `python -m memk.bench.report` from the JSON in [bench/results/]({results_link}); rerun "
        "`memk bench --json bench/results/<machine>.json` and the report to refresh. Speed-up = the baseline's median "
        "time / memk's, measured in the same run on the same machine; every case is checked against a float64 "
        "reference before it is timed. On a CPU, a log-prob case's time is also given as a multiple of its floor: "
        "the least time its reads, writes and exps take at the rates the machine showed next to it "
        "(bench/roofline.py). Peak memory: the CUDA allocator's peak on GPU, the resident-set "
        "high-water mark on CPU, above what the inputs already hold.",
        "",
    ]
    if not reports:
        lines += ["No results yet.", ""]
    header = ["suite", "case", "variant", "median", "throughput", "speed-up", "peak mem", "device", "versions", "date", "data"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for path, report in reports:
        for row in headline_rows(path, report):
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for _, report in reports:
        grows = [s for s in report.get("scaling", []) if s["suite"] in ("logprob", "train")
                 and ("memk" in s["variant"] or "fused" in s["variant"] or s["variant"] in ("log_softmax+gather", "F.cross_entropy"))]
        if grows:
            lines.append(f"How time grows with the size swept on {report['env']['device_name']} (time ∝ size^k): " + "; ".join(
                f"{s['family']} {s['variant']}: k = {s['exponent']:.2f} over {s['axis']}" for s in grows) + ".")
            lines.append("")
    if not any(r["env"]["device_type"] == "cuda" for _, r in reports):
        lines.append("GPU rows are owed: no GPU has measured this suite yet (`memk bench --device cuda --json "
                     "bench/results/<gpu>.json` on one, then rerun the report).")
        lines.append("")
    if plots:
        lines.append("Throughput against size: " + ", ".join(
            f"[{os.path.basename(p)}]({os.path.relpath(p, doc_dir)})" for p in plots) + ".")
        lines.append("")
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"the page has no {START} ... {END} markers; add them where the section belongs")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + "\n" + section + "\n" + END + tail


@click.command()
@click.option("--results", "results_dir", default=None, help="Folder of result JSON (default: bench/results beside this file).")
@click.option("--doc", default=None,
              help="Page to update between the bench markers (default: the repository's docs/benchmarks.md).")
def main(results_dir, doc):
    """Rewrite the plots and the benchmarks page's results section from the result JSON."""
    here = os.path.dirname(os.path.abspath(__file__))
    results_dir = os.path.abspath(results_dir or os.path.join(here, "results"))
    doc = doc or os.path.join(os.path.dirname(here), "docs", "benchmarks.md")
    reports = load_reports(results_dir)
    plots = []
    for path, report in reports:  # plots named after their JSON: two files of one machine keep theirs apart
        stem = os.path.splitext(os.path.basename(path))[0]
        for suite in ("logprob", "train", "bits"):
            p = plot_suite(report, suite, os.path.join(results_dir, f"{suite}_{stem}.png"))
            if p:
                plots.append(p)

    def section_for(folder: str) -> str:
        cwd = os.getcwd()
        os.chdir(folder)  # links in the table are relative to the file they are written into
        try:
            return render_section(reports, plots, folder, results_dir)
        finally:
            os.chdir(cwd)

    with open(os.path.join(results_dir, "SUMMARY.md"), "w") as f:
        f.write("# memk bench results\n\n(the benchmarks page's results section, regenerated by "
                "`python -m memk.bench.report`; links are relative to this file)\n" + section_for(results_dir) + "\n")
    if os.path.exists(doc):
        with open(doc) as f:
            text = f.read()
        with open(doc, "w") as f:
            f.write(replace_section(text, section_for(os.path.dirname(os.path.abspath(doc)))))
        click.echo(f"updated {doc}")
    else:
        click.echo(f"no {doc}: wrote only {os.path.join(results_dir, 'SUMMARY.md')}")
    for p in plots:
        click.echo(f"wrote {p}")


if __name__ == "__main__":
    main()
