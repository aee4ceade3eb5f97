"""Whole `memk run-capacity` or `memk run-generalization` commands timed one after another: what
the wall-clock scripts (ray_vs_local.py, preset_wall.py) share."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version

import click

TIMING = {"train_seconds", "finished_at", "host", "torch_threads", "trained_as"}  # row fields that name how, not what


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_writable(json_path: str | None) -> None:
    """Fail now, not after minutes of measuring, where the results could not be written."""
    if json_path:
        with open(json_path, "a"):
            pass


def policy_env() -> dict:
    """This environment less the thread pins (MEMK_NUM_THREADS, OMP_NUM_THREADS): memk's own thread policy."""
    from memk.memorize.runtime import THREADS_ENV

    return {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS")}


def machine() -> dict:
    """What the figures were measured on, and memk's commit (None outside a git checkout)."""
    from memk.bench.timing import cpu_name
    from memk.memorize.runtime import cpu_cores

    here = os.path.dirname(os.path.abspath(__file__))
    git = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"cpu": cpu_name(), "cores": cpu_cores(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch": package_version("torch"), "python": sys.version.split()[0],
            "memk_commit": git.stdout.strip() if git.returncode == 0 else None}


def run_rows(folder: str) -> dict[str, dict]:
    """A finished command's rows by run id, the fields that say how it trained left out."""
    with open(os.path.join(folder, "runs.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["run_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def alphas(folder: str) -> dict[str, float]:
    """α through the origin per precision, from a finished capacity command's summary.json."""
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    return {p: s["fit"]["through_origin"]["alpha"] for p, s in summary["precisions"].items()}


def f1_law(folder: str) -> dict[str, float]:
    """The fitted membership-F1 law's coefficients and R², from a finished generalization command's summary.json."""
    with open(os.path.join(folder, "summary.json")) as f:
        law = json.load(f)["f1_law"]
    return {k: law[k] for k in ("c1", "c2", "c3", "r2")}


SCIENCE = {"run-capacity": ("alpha", alphas), "run-generalization": ("f1_law", f1_law)}  # what each command measures


def timed_command(command: str, preset: str, extra: list[str], env: dict, folder: str) -> dict:
    """Run `memk COMMAND --preset PRESET EXTRA --out FOLDER` and say how long it took, under what load."""
    argv = [sys.executable, "-m", "memk.cli", command, "--preset", preset, *extra, "--out", folder, "--no-progress"]
    load = load_average()
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}")
    shown = [os.path.basename(folder) if part == folder else part for part in argv[3:]]  # not the temp path
    return {"command": " ".join(["memk", *shown]), "env": {k: env[k] for k in env if k.startswith("MEMK_")},
            "load_1_5_15_before": load, "wall_s": round(wall, 1),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


BUSY_LOOP = "while True: pass"  # a process that keeps one core busy, as another user's job would


@contextlib.contextmanager
def busy_loops(count: int):
    """`count` processes spinning on the CPU for as long as the block runs (none for 0); yields them."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield loops
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def time_ways(preset: str, ways: dict[str, tuple[list[str], dict]],
              command: str = "run-capacity", busy: int = 0) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each way (name -> extra options, environment) of `memk COMMAND --preset PRESET` run in turn
    into a fresh folder, beside `busy` busy loops (busy_loops): its timing with what it measured
    (α, or the F1 law), and its rows (run_rows), by name."""
    key, science = SCIENCE[command]
    timings, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (extra, env) in ways.items():
            folder = os.path.join(tmp, name.replace(" ", "-"))
            click.echo(f"{name}: memk {command} --preset {preset} {' '.join(extra)} (load {load_average()[0]})",
                       err=True)
            with busy_loops(busy):
                timings[name] = timed_command(command, preset, extra, env, folder)
            timings[name]["busy_loops"] = busy
            timings[name][key] = science(folder)  # how far ensembles, threads or workers move the science
            rows[name] = run_rows(folder)
            click.echo(f"  {timings[name]['wall_s']} s", err=True)
    return timings, rows


def write_report(report: dict, json_path: str | None) -> None:
    """The report as JSON, to json_path or standard output."""
    text = json.dumps(report, indent=1) + "\n"
    if json_path:
        with open(json_path, "w") as f:
            f.write(text)
        click.echo(f"wrote {json_path}", err=True)
    else:
        click.echo(text)
