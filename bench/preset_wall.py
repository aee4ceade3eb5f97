"""The `default` capacity preset's wall-clock before and after ensembles and workers (issue 13).

    python -m memk.bench.preset_wall [--json bench/results/default-preset-wall-2core.json] [--smoke]

Runs `memk run-capacity --preset default` (`--preset smoke` with --smoke: a test of the
script, seconds) four ways, one after the other, each into a fresh folder:

- one at a time (`--ensemble off --workers 1`): memk before ensembles and workers, on
  memk's thread policy (one thread for these small models);
- ensembles (`--ensemble auto --workers 1`): each model's runs stacked where a probe
  measures that faster, one ensemble at a time (memk's default until 2026-11-27 afternoon);
- side by side (`--ensemble off --workers auto`): one run at a time per worker, a worker
  per core, one thread each;
- the default (`--ensemble auto --workers auto`): the ensembles side by side.

Each figure is the whole command's wall-clock, with the load average before it. The rows
are compared with one-at-a-time's (timing aside): side by side must equal them exactly
(each run on one thread either way); ensembles round float32 a little differently, so α
is reported for each. Run it on an idle machine: other work skews every figure.
"""

from __future__ import annotations

import json
import time

import click

from memk.bench.command_runs import check_writable, machine, policy_env, time_ways, write_report

WAYS = {
    "one at a time": ["--ensemble", "off", "--workers", "1"],
    "ensembles": ["--ensemble", "auto", "--workers", "1"],
    "side by side": ["--ensemble", "off", "--workers", "auto"],
    "default": [],
}


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
@click.option("--smoke", is_flag=True, help="the smoke preset: a test of the script, not a measurement")
def main(json_path, smoke):
    check_writable(json_path)
    preset = "smoke" if smoke else "default"
    env = policy_env()
    report = {"schema": "memk-preset-wall/1", "preset": preset, "smoke": smoke, **machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {}}
    report["runs"], rows = time_ways(preset, {name: (extra, env) for name, extra in WAYS.items()})
    report["same_rows_as_one_at_a_time"] = {name: rows[name] == rows["one at a time"] for name in WAYS
                                            if name != "one at a time"}
    walls = {name: run["wall_s"] for name, run in report["runs"].items()}
    report["speedup_over_one_at_a_time"] = {name: round(walls["one at a time"] / wall, 2)
                                            for name, wall in walls.items() if name != "one at a time"}
    click.echo(json.dumps({"wall_s": walls, "speedup": report["speedup_over_one_at_a_time"],
                           "same_rows": report["same_rows_as_one_at_a_time"]}), err=True)
    write_report(report, json_path)


if __name__ == "__main__":
    main()
