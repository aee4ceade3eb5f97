"""A sweep on Ray workers against the local executor, on this machine's CPU (issue 14).

    python -m memk.bench.ray_vs_local [--json bench/results/ray-vs-local-2core.json] [--smoke]

Runs `memk run-capacity --preset default` (`--preset smoke` with --smoke: a test of the
script, seconds) four ways, one after the other, each into a fresh folder:

- ray: `--executor ray --ensemble off`, a local Ray instance with one task per core, each
  task one run on one thread;
- local, every core: the local executor, one run at a time (`--ensemble off`) with torch's
  threads pinned to every core (MEMK_NUM_THREADS), what the issue compares against;
- local, memk's policy: the same with memk's thread policy (one thread for these small
  models: memk.memorize.runtime.cpu_threads_for);
- local, memk's default: the command as it stands (`--ensemble auto`: each model's runs as
  one ensemble where a probe measures that faster).

Each figure is the whole command's wall-clock (Ray's start-up included), with the load
average before it. The rows are compared (timing aside): the Ray rows must equal those of
memk's one-thread policy; more threads, or ensembles, may move float32 results slightly.
Run it on an idle machine: other work skews every figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version

import click

TIMING = {"train_seconds", "finished_at", "host", "torch_threads", "trained_as"}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _rows(folder: str) -> dict[str, dict]:
    with open(os.path.join(folder, "runs.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["run_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def _timed(preset: str, extra: list[str], env: dict, folder: str) -> dict:
    command = [sys.executable, "-m", "memk.cli", "run-capacity", "--preset", preset, *extra, "--out", folder,
               "--no-progress"]
    load = _load()
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    shown = [os.path.basename(folder) if part == folder else part for part in command[3:]]  # not the temp path
    return {"command": " ".join(["memk", *shown]), "env": {k: env[k] for k in env if k.startswith("MEMK_")},
            "load_1_5_15_before": load, "wall_s": round(wall, 1),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
@click.option("--smoke", is_flag=True, help="the smoke preset: a test of the script, not a measurement")
def main(json_path, smoke):
    from memk.bench.timing import cpu_name
    from memk.memorize.runtime import THREADS_ENV

    if json_path:  # fail now, not after minutes of measuring
        with open(json_path, "a"):
            pass
    cores = len(os.sched_getaffinity(0))
    preset = "smoke" if smoke else "default"
    base = {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS")}
    ways = {
        "ray": (["--executor", "ray", "--cpus-per-task", "1", "--ensemble", "off"], base),
        "local, every core": (["--ensemble", "off"], {**base, THREADS_ENV: str(cores)}),
        "local, memk's policy": (["--ensemble", "off"], base),
        "local, memk's default": ([], base),
    }
    report = {"schema": "memk-ray-vs-local/1", "preset": preset, "smoke": smoke, "cpu": cpu_name(), "cores": cores,
              "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "torch": _version("torch"), "ray": _version("ray"), "python": sys.version.split()[0],
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (extra, env) in ways.items():
            click.echo(f"{name}: memk run-capacity --preset {preset} {' '.join(extra)} (load {_load()[0]})", err=True)
            report["runs"][name] = _timed(preset, extra, env, os.path.join(tmp, name.replace(" ", "-")))
            click.echo(f"  {report['runs'][name]['wall_s']} s", err=True)
        rows = {name: _rows(os.path.join(tmp, name.replace(" ", "-"))) for name in ways}
        for name in ways:  # α through the origin, per precision: how far ensembles or threads move the science
            with open(os.path.join(tmp, name.replace(" ", "-"), "summary.json")) as f:
                summary = json.load(f)
            report["runs"][name]["alpha"] = {p: s["fit"]["through_origin"]["alpha"] for p, s in summary["precisions"].items()}
    report["same_rows_as_ray"] = {name: rows[name] == rows["ray"] for name in ways if name != "ray"}
    walls = {name: run["wall_s"] for name, run in report["runs"].items()}
    report["speedup_of_ray"] = {name: round(wall / walls["ray"], 2) for name, wall in walls.items() if name != "ray"}
    click.echo(json.dumps({"wall_s": walls, "speedup_of_ray": report["speedup_of_ray"],
                           "same_rows_as_ray": report["same_rows_as_ray"]}), err=True)
    text = json.dumps(report, indent=1) + "\n"
    if json_path:
        with open(json_path, "w") as f:
            f.write(text)
        click.echo(f"wrote {json_path}", err=True)
    else:
        click.echo(text)


if __name__ == "__main__":
    main()
