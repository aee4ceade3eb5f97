"""The `default` presets' wall-clock before and after ensembles and workers (issue 13).

    python -m memk.bench.preset_wall [--json bench/results/default-preset-wall-2core.json] [--smoke]
    python -m memk.bench.preset_wall --command run-generalization [--json ...] [--smoke]
    python -m memk.bench.preset_wall --busy 1 --ways "side by side,default" [--json ...]

Runs `memk run-capacity --preset default` (`--preset smoke` with --smoke: a test of the
script, seconds) four ways, one after the other, each into a fresh folder:

- one at a time (`--ensemble off --workers 1`): memk before ensembles and workers, on
  memk's thread policy (one thread for these small models);
- ensembles (`--ensemble auto --workers 1`): each model's runs stacked where a probe
  measures that faster, one ensemble at a time (memk's default until 2026-11-27 afternoon);
- side by side (`--ensemble off --workers auto`): one run at a time per worker, a worker
  per core, one thread each;
- the default (`--ensemble auto --workers auto`): the ensembles side by side.

`--command run-generalization` times that command's preset the same ways, except that
"side by side" asks for a worker per core by number (`--workers N`), and adds "ensembles
side by side" (`--ensemble auto --workers N`); "default" is whatever the commit in the
report makes of no options. `--ways` times only the ways named.

Each figure is the whole command's wall-clock, with the load average before it. The rows
are compared with one-at-a-time's (timing aside): side by side equals them exactly where
each run trains on one thread either way (the capacity preset's small models; the
generalization preset's V-2048 runs take two threads alone, so there the rows round
float32 differently); ensembles round float32 a little differently too, so what the
command measures (α, or the F1 law's coefficients) is reported for each. Run it on an
idle machine: other work skews every figure. `--busy N` times each way beside N processes
spinning on the CPU, started before and ended after each command: a shared machine.
"""

from __future__ import annotations

import json
import time

import click

from memk.bench.command_runs import SCIENCE, check_writable, machine, policy_env, time_ways, write_report

CAPACITY_WAYS = {
    "one at a time": ["--ensemble", "off", "--workers", "1"],
    "ensembles": ["--ensemble", "auto", "--workers", "1"],
    "side by side": ["--ensemble", "off", "--workers", "auto"],
    "default": [],
}


def generalization_ways(cores: int) -> dict[str, list[str]]:
    return {
        "one at a time": ["--ensemble", "off", "--workers", "1"],
        "ensembles": ["--ensemble", "auto", "--workers", "1"],
        "side by side": ["--ensemble", "off", "--workers", str(cores)],
        "ensembles side by side": ["--ensemble", "auto", "--workers", str(cores)],
        "default": [],
    }


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
@click.option("--smoke", is_flag=True, help="the smoke preset: a test of the script, not a measurement")
@click.option("--command", type=click.Choice(list(SCIENCE)), default="run-capacity", show_default=True,
              help="the experiment whose preset is timed")
@click.option("--ways", help="only these ways, comma-separated (e.g. 'one at a time,default'); default: all")
@click.option("--busy", type=click.IntRange(min=0), default=0, show_default=True,
              help="time each way beside this many busy loops (processes spinning on a core), as on a shared machine")
def main(json_path, smoke, command, ways, busy):
    check_writable(json_path)
    preset = "smoke" if smoke else "default"
    env = policy_env()
    report = {"schema": "memk-preset-wall/1", "command": f"memk {command}", "preset": preset, "smoke": smoke,
              **machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {}}
    every = CAPACITY_WAYS if command == "run-capacity" else generalization_ways(report["cores"])
    chosen = [w.strip() for w in ways.split(",")] if ways else list(every)
    unknown = [w for w in chosen if w not in every]
    if unknown:
        raise click.UsageError(f"--ways: no way named {', '.join(unknown)}; choose among {', '.join(every)}")
    report["busy_loops"] = busy
    report["runs"], rows = time_ways(preset, {name: (every[name], env) for name in chosen}, command, busy)
    walls = {name: run["wall_s"] for name, run in report["runs"].items()}
    if "one at a time" in chosen:
        report["same_rows_as_one_at_a_time"] = {name: rows[name] == rows["one at a time"] for name in chosen
                                                if name != "one at a time"}
        report["speedup_over_one_at_a_time"] = {name: round(walls["one at a time"] / wall, 2)
                                                for name, wall in walls.items() if name != "one at a time"}
    click.echo(json.dumps({"wall_s": walls, "speedup": report.get("speedup_over_one_at_a_time"),
                           "same_rows": report.get("same_rows_as_one_at_a_time")}), err=True)
    write_report(report, json_path)


if __name__ == "__main__":
    main()
