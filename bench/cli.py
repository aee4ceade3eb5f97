"""`memk bench`: run the benchmark suites and print a table of medians, ratios and peak memory.

The command is a click object; memk's CLI group adds it with `main.add_command(bench)`.
"""

from __future__ import annotations

import sys

import click

from . import cases as C
from .common import resolve_device
from .run import RunOptions, format_record, format_table, run_groups, write_json


@click.command("bench")
@click.option("--suite", "suites", type=click.Choice(C.SUITES + ("all",)), multiple=True, default=("all",),
              show_default=True, help="Which suite to run; repeat the option for several.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where to run (default: cuda if torch sees one, else cpu).")
@click.option("--dtype", "dtypes", type=click.Choice(C.DTYPE_NAMES), multiple=True,
              help="Data types to run; repeatable. Default per suite and device: CPU float32 (train also "
                   "bfloat16); CUDA logprob bfloat16+float32, attention bfloat16, train float32+tf32+bfloat16. "
                   "A dtype that means nothing to a suite is ignored there (tf32 outside train).")
@click.option("--quick", is_flag=True, help="Small sizes, short timing, no torch.compile: about a minute on 2 CPU cores.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write every result (with environment, checks, ratios) to this JSON file.")
@click.option("--filter", "pattern", default=None, help="Only cases whose id contains this text.")
@click.option("--max-time", type=float, default=None,
              help="CPU seconds of timed rounds per case (default 1.0; 0.15 with --quick).")
def bench(suites, device, dtypes, quick, json_path, pattern, max_time):
    """Benchmark memk's kernels and GPT-2 training against the baselines users would pick.

    Every case is checked against a float64 reference once before it is timed; a wrong answer
    is refused and gets no number. A case whose backend cannot run here is listed as skipped.
    """
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    names = list(C.SUITES) if "all" in suites else list(dict.fromkeys(suites))
    groups = C.groups_for(names, dev, list(dtypes) or None, quick=quick)
    if not groups:
        raise click.UsageError(f"no case matches --suite {' '.join(suites)} --dtype {' '.join(dtypes)}")
    n_cases = sum(len(g.variants) for g in groups)
    click.echo(f"memk bench: {n_cases} cases in {len(groups)} groups on {dev.type}" + (" (quick)" if quick else ""), err=True)

    def progress(record):
        row = format_record(record)
        click.echo(f"  {record['id']}: {row.median} {row.throughput} {row.speed_up or row.note}".rstrip(), err=True)

    options = RunOptions(max_time=max_time if max_time is not None else (0.15 if quick else 1.0), progress=progress)
    report = run_groups(groups, dev, options, case_filter=(lambda c: pattern in c.id) if pattern else None)
    report["quick"] = quick
    click.echo(format_table(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if any(r["status"] in ("refused", "error") for r in report["results"]):
        bad = [r["id"] for r in report["results"] if r["status"] in ("refused", "error")]
        click.echo(f"{len(bad)} case(s) refused or failed: {', '.join(bad)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    bench()
