"""`memk bench`: run the benchmark suites and print a table of medians, ratios and peak memory.

The command is a click object; memk's CLI group adds it with `main.add_command(bench)`. This
module imports no torch: `memk bench --help` stays instant, and the suites are imported once
the command runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

import click

from .choices import DTYPE_NAMES, PRESETS, SUITES

# Measured on the 2-core CI machine (AMD EPYC, torch 2.13 CPU): 28 s with memk's fused kernels
# already compiled; their first compile adds 20-40 s. docs/benchmarks.md gives the
# same figure (tests/test_bench.py checks that they agree).
QUICK_DURATION = "about half a minute"
QUICK_HELP = (f"Small sizes, short timing, no torch.compile: {QUICK_DURATION} on 2 CPU cores once memk's "
              "kernels are compiled.")


def json_path_problem(path: str) -> str | None:
    """Why the JSON report cannot be written at `path` (None if it can), found before anything runs."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return f"{path} is a folder; give a file name in it, e.g. {os.path.join(path, 'bench.json')}"
    folder = os.path.dirname(target)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder; choose a path inside a folder"
    if existing != folder:
        return f"folder {folder} does not exist; create it (mkdir -p {folder}) or choose another path"
    if os.path.exists(target) and not os.access(target, os.W_OK):
        return f"{path} exists and is not writable; choose another path"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create files in {folder}; choose a folder you can write to"
    return None


def _check_json_path(ctx, param, value):
    if value is not None:
        problem = json_path_problem(value)
        if problem:
            raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (as `timeout` sends) ends the run like Ctrl-C: the cases finished so far are kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress_printer():
    """Names each case as it starts (results come once, in the table): in place on a terminal,
    one line per case in a log, so a run that hangs shows where."""
    on_terminal = sys.stderr.isatty()

    def show(index, total, case):
        if on_terminal:
            click.echo(f"\r\033[K[{index}/{total}] {case.id}", nl=False, err=True)
        else:
            click.echo(f"[{index}/{total}] {case.id}", err=True)

    def done():
        if on_terminal:
            click.echo("\r\033[K", nl=False, err=True)

    return show, done


@click.command("bench")
@click.option("--suite", "suites", type=click.Choice(SUITES + ("all",)), multiple=True, default=("all",),
              show_default=True, help="Which suite to run; repeat the option for several.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="default", show_default=True,
              help="; ".join(f"{name}: {what}" for name, what in PRESETS.items()) + ".")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where to run (default: cuda if torch sees one, else cpu).")
@click.option("--dtype", "dtypes", type=click.Choice(DTYPE_NAMES), multiple=True,
              help="Data types to run; repeatable. Default per suite and device: CPU float32 (train also "
                   "bfloat16); CUDA logprob bfloat16+float32, attention bfloat16, train float32+tf32+bfloat16. "
                   "A dtype that means nothing to a suite is ignored there (tf32 outside train).")
@click.option("--quick", is_flag=True, help=QUICK_HELP)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=_check_json_path,
              help="Also write every result (with environment, checks, ratios) to this JSON file.")
@click.option("--filter", "pattern", default=None, help="Only cases whose id contains this text.")
@click.option("--max-time", type=float, default=None,
              help="CPU seconds of timed rounds per case (default 1.0; 0.15 with --quick).")
@click.option("--triton-interpreter", is_flag=True,
              help="On CPU, run memk's Triton kernels under Triton's interpreter (sets TRITON_INTERPRET=1): "
                   "checks them end to end; their times mean nothing.")
def bench(suites, preset, device, dtypes, quick, json_path, pattern, max_time, triton_interpreter):
    """Benchmark memk's kernels and GPT-2 training against the baselines users would pick.

    Every case is checked against a float64 reference once before it is timed; a wrong answer
    is refused and gets no number. A case whose backend cannot run here is listed as skipped.
    SIGTERM or Ctrl-C ends the run early, keeping (and writing) the cases finished so far.
    """
    if triton_interpreter:
        _start_interpreter()
    from . import cases as C
    from .common import resolve_device
    from .run import RunOptions, format_table, run_groups, write_json

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if triton_interpreter and dev.type != "cpu":
        raise click.UsageError("--triton-interpreter is for CPU runs; drop it, or add --device cpu")
    names = list(SUITES) if "all" in suites else list(dict.fromkeys(suites))
    groups = C.groups_for(names, dev, list(dtypes) or None, quick=quick, preset=preset, interpreter=triton_interpreter)
    if not groups:
        raise click.UsageError(f"no case matches --suite {' '.join(suites)} --preset {preset} --dtype {' '.join(dtypes)}")
    n_cases = sum(len(g.variants) for g in groups)
    click.echo(f"memk bench: {n_cases} cases in {len(groups)} groups on {dev.type}"
               + (" (quick)" if quick else "") + (f", preset {preset}" if preset != "default" else ""), err=True)

    show, done = _progress_printer()
    options = RunOptions(max_time=max_time if max_time is not None else (0.15 if quick else 1.0), progress=show)
    with _sigterm_as_interrupt():
        report = run_groups(groups, dev, options, case_filter=(lambda c: pattern in c.id) if pattern else None)
    done()
    report["quick"] = quick
    report["preset"] = preset
    click.echo(format_table(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"wrote {json_path}", err=True)
    failed = False
    if report["interrupted"]:
        click.echo(f"memk bench was {report['interrupted']}", err=True)
        failed = True
    bad = [r["id"] for r in report["results"] if r["status"] in ("refused", "error")]
    if bad:
        click.echo(f"{len(bad)} case(s) refused or failed: {', '.join(bad)}", err=True)
        failed = True
    if failed:
        sys.exit(1)


def _start_interpreter() -> None:
    """TRITON_INTERPRET=1 takes effect only if set before triton is first imported."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise click.UsageError("--triton-interpreter: triton was imported before TRITON_INTERPRET=1 could be set; "
                               "run with TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


if __name__ == "__main__":
    bench()
