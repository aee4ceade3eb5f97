"""A sweep on Ray workers against the local executor, on this machine's CPU (issue 14).

    python -m memk.bench.ray_vs_local [--json bench/results/ray-vs-local-2core.json] [--smoke]

Runs `memk run-capacity --preset default` (`--preset smoke` with --smoke: a test of the
script, seconds) four ways, one after the other, each into a fresh folder:

- ray: `--executor ray --ensemble off`, a local Ray instance with one task per core, each
  task one run on one thread;
- local, every core: the local executor, one run at a time (`--ensemble off --workers 1`)
  with torch's threads pinned to every core (MEMK_NUM_THREADS), what the issue compares against;
- local, memk's policy: the same with memk's thread policy (one thread for these small
  models: memk.memorize.runtime.cpu_threads_for);
- local, memk's default: the command as it stands (`--ensemble auto --workers auto` since
  2026-11-27 afternoon: each model's runs as one ensemble where a probe measures that
  faster, the ensembles side by side, one per core; `--ensemble auto` alone before).

Each figure is the whole command's wall-clock (Ray's start-up included), with the load
average before it. The rows are compared (timing aside): the Ray rows must equal those of
memk's one-thread policy; more threads, or ensembles, may move float32 results slightly.
Run it on an idle machine: other work skews every figure.
"""

from __future__ import annotations

import json
import time

import click

from memk.bench.command_runs import check_writable, machine, package_version, policy_env, time_ways, write_report


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
@click.option("--smoke", is_flag=True, help="the smoke preset: a test of the script, not a measurement")
def main(json_path, smoke):
    from memk.memorize.runtime import THREADS_ENV, cpu_cores

    check_writable(json_path)
    cores = cpu_cores()
    preset = "smoke" if smoke else "default"
    base = policy_env()
    ways = {
        "ray": (["--executor", "ray", "--cpus-per-task", "1", "--ensemble", "off"], base),
        "local, every core": (["--ensemble", "off", "--workers", "1"], {**base, THREADS_ENV: str(cores)}),
        "local, memk's policy": (["--ensemble", "off", "--workers", "1"], base),
        "local, memk's default": ([], base),
    }
    report = {"schema": "memk-ray-vs-local/1", "preset": preset, "smoke": smoke, **machine(),
              "ray": package_version("ray"), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {}}
    report["runs"], rows = time_ways(preset, ways)
    report["same_rows_as_ray"] = {name: rows[name] == rows["ray"] for name in ways if name != "ray"}
    walls = {name: run["wall_s"] for name, run in report["runs"].items()}
    report["speedup_of_ray"] = {name: round(wall / walls["ray"], 2) for name, wall in walls.items() if name != "ray"}
    click.echo(json.dumps({"wall_s": walls, "speedup_of_ray": report["speedup_of_ray"],
                           "same_rows_as_ray": report["same_rows_as_ray"]}), err=True)
    write_report(report, json_path)


if __name__ == "__main__":
    main()
