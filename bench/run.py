"""Running cases: build, check against float64 once, time, measure memory, compute ratios, write JSON.

Both front ends use this: `memk bench` (bench/cli.py) calls run_groups; the pytest-benchmark
test (tests/benchmarks/bench_cases.py) calls prepare for one case and lets pytest-benchmark time it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from memk import kernels

from . import timing
from .case import Case, Group, Runner, Skip
from .common import format_bytes, format_rate, format_time, synced

SCHEMA = "memk-bench/1"
# The fields every result carries (tests/test_bench.py checks them).
RESULT_FIELDS = (
    "id", "suite", "family", "group", "variant", "role", "description", "compare_to", "dtype", "device",
    "device_name", "torch", "triton", "cuda", "date", "params", "sweep", "status", "reason", "check",
    "time", "throughput", "tflops", "mfu", "memory", "ratios", "ratio_vs_best_baseline", "torch_threads",
    "cpu_isa_flags", "floor", "fraction_of_floor",
)


class Refused(Exception):
    """The variant's answer did not match the float64 reference: it gets no timing."""

    def __init__(self, check: dict):
        worst = ", ".join(f"{k}: error {e:.3g} > tolerance {t:.3g}" for k, (e, t) in check.items() if not e <= t)
        super().__init__(f"wrong answer, refused before timing ({worst})")
        self.check = check


class InputCache:
    """Holds one group's inputs at a time: the variants of a group run one after another on the same tensors."""

    def __init__(self):
        self.key, self.inputs = None, None

    def get(self, group: Group, device: torch.device) -> dict:
        if self.key != group.key:
            self.clear()
            torch.manual_seed(0)
            self.inputs, self.key = group.make_inputs(device), group.key
        return self.inputs

    def clear(self) -> None:
        self.key = self.inputs = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def command_line(argv: list[str]) -> str:
    """The command as a result file records it, with no path of this machine: the program, and every
    absolute path given (`--json /x/y.json` or `--json=/x/y.json`), by its file name."""
    def shown(arg: str) -> str:
        option, equals, value = arg.partition("=")
        if equals and option.startswith("--") and os.path.isabs(value):
            return f"{option}={os.path.basename(value)}"
        return os.path.basename(arg) if os.path.isabs(arg) else arg

    return " ".join([os.path.basename(argv[0]), *map(shown, argv[1:])])


def check_outputs(group: Group, inputs: dict, runner: Runner) -> dict:
    """{name: (error, tolerance)} of the variant's answer; raises Refused if any is out of tolerance or NaN."""
    check = group.check(inputs, runner.outputs())
    if not all(err <= tol for err, tol in check.values()):  # NaN compares False: refused
        raise Refused(check)
    return check


def prepare(case: Case, inputs: dict, device: torch.device) -> tuple[Runner, dict]:
    """Build the variant and check its answer. Raises Skip (cannot run here), Refused (wrong answer)."""
    try:
        runner = case.variant.build(inputs, device)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"backend unavailable: {exc}") from exc
    try:
        check = check_outputs(case.group, inputs, runner)
    except BaseException:
        runner.close()
        raise
    return runner, check


def check_json(check: dict | None) -> dict | None:
    """{name: (error, tolerance)} as JSON: {name: {"error", "tolerance"}}, a non-finite error as text."""
    if check is None:
        return None
    return {k: {"error": (e if math.isfinite(e) else str(e)), "tolerance": t} for k, (e, t) in check.items()}


def run_case(case: Case, inputs: dict, device: torch.device, env: dict, max_time: float) -> dict:
    """One result record; never raises for a variant's own failure (that is the record's status)."""
    g, v = case.group, case.variant
    record = {
        "id": case.id, "suite": g.suite, "family": g.family, "group": g.key, "variant": v.name, "role": v.role,
        "description": v.description, "compare_to": list(v.compare_to), "dtype": case.dtype, "device": device.type,
        "device_name": env["device_name"], "torch": env["torch"], "triton": env["triton"], "cuda": env["cuda"],
        "date": env["date"], "params": g.params, "sweep": {"axis": g.sweep_axis, "value": g.sweep_value},
        "status": None, "reason": None, "check": None, "time": None, "throughput": None, "tflops": None,
        "mfu": None, "memory": None, "ratios": {}, "ratio_vs_best_baseline": None,
        "torch_threads": env["torch_threads"], "cpu_isa_flags": env.get("cpu_isa_flags"), "floor": None,
        "fraction_of_floor": None,
    }
    try:
        runner, check = prepare(case, inputs, device)
    except Skip as exc:
        record.update(status="skipped", reason=str(exc))
        return record
    except Refused as exc:
        record.update(status="refused", reason=str(exc), check=check_json(exc.check))
        return record
    except Exception as exc:  # a variant that crashes is reported, and the suite goes on
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        traceback.print_exc(file=sys.stderr)
        return record
    try:
        record["check"] = check_json(check)
        fn = synced(runner.call, device)
        if device.type == "cuda":
            t = timing.time_cuda(runner.call)  # CUDA events time the kernels; no host sync inside the timed call
        else:
            t = timing.time_cpu(fn, max_time=max_time, min_rounds=5 if max_time >= 0.5 else 3)
        record["time"] = t.to_dict()
        record["throughput"] = {"value": g.work / t.median_s, "unit": f"{g.work_unit}/s"}
        if g.flops:
            record["tflops"] = g.flops / t.median_s / 1e12
            peak = timing.peak_tflops(env["device_name"], case.dtype) if device.type == "cuda" else None
            if peak:
                record["mfu"] = {"value": record["tflops"] / peak.tflops, "peak_tflops": peak.tflops,
                                 "peak_source": peak.source}
        runner.reset()  # last call's gradients would otherwise be reused and hide this call's
        record["memory"] = timing.peak_memory(fn, device)
        record["status"] = "ok"
    except Exception as exc:
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        traceback.print_exc(file=sys.stderr)
    finally:
        runner.close()
    return record


def compute_ratios(records: list[dict]) -> None:
    """Speed-ups (baseline median / this median) within each group, against each named baseline that ran."""
    by_group: dict[str, dict[str, dict]] = {}
    for r in records:
        by_group.setdefault(r["group"], {})[r["variant"]] = r
    for variants in by_group.values():
        for r in variants.values():
            if r["status"] != "ok":
                continue
            ratios = {}
            for name in r["compare_to"]:
                base = variants.get(name)
                if base is not None and base["status"] == "ok":
                    ratios[name] = base["time"]["median_s"] / r["time"]["median_s"]
            r["ratios"] = ratios
            r["ratio_vs_best_baseline"] = min(ratios.values()) if ratios else None


def scaling(records: list[dict]) -> list[dict]:
    """How time grows with the swept size: the least-squares slope of log(time) on log(size),
    per family and variant (1.0 = linear)."""
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in records:
        if r["status"] == "ok":
            series.setdefault((r["suite"], r["family"], r["variant"]), []).append((r["sweep"]["value"], r["time"]["median_s"]))
    out = []
    for (suite, family, variant), points in series.items():
        if len({x for x, _ in points}) < 2:
            continue
        xs = [math.log(x) for x, _ in points]
        ys = [math.log(y) for _, y in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        axis = next(r["sweep"]["axis"] for r in records if r["family"] == family)
        out.append({"suite": suite, "family": family, "variant": variant, "axis": axis,
                    "points": sorted(points), "exponent": slope})
    return out


def group_floor(group: Group, inputs: dict, device: torch.device) -> dict | None:
    """The group's floor measured now, next to its cases (roofline.py); {"error": ...} if measuring failed."""
    if group.floor is None:
        return None
    try:
        return group.floor(inputs, device)
    except Exception as exc:  # no floor is no reason to lose the cases
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def add_floor(record: dict, floor: dict | None) -> None:
    """The floor into a result, and the result's median as a fraction of it."""
    record["floor"] = floor
    if floor and floor.get("time_s") and record["status"] == "ok":
        record["fraction_of_floor"] = record["time"]["median_s"] / floor["time_s"]


@dataclass
class RunOptions:
    max_time: float = 1.0  # CPU seconds of timed rounds per case
    # called as each case starts, with its position (1-based) and the number of cases
    progress: Callable[[int, int, Case], None] | None = None


def run_groups(groups: list[Group], device: torch.device, options: RunOptions | None = None,
               case_filter: Callable[[Case], bool] | None = None) -> dict:
    """Run every case of the groups; returns the JSON-ready report.

    An interruption (Ctrl-C, or SIGTERM where the caller turns it into KeyboardInterrupt, as
    `memk bench` does) ends the run early: the report then holds the cases finished so far and
    says so in "interrupted".
    """
    options = options or RunOptions()
    env = timing.environment(device)
    cache = InputCache()
    selected = [(g, [c for c in (Case(g, v) for v in g.variants) if case_filter is None or case_filter(c)]) for g in groups]
    total = sum(len(cases) for _, cases in selected)
    records = []
    interrupted = None
    started = time.time()
    try:
        for group, cases in selected:
            if not cases:
                continue
            inputs = cache.get(group, device)
            floor = group_floor(group, inputs, device)
            for case in cases:
                if options.progress:
                    options.progress(len(records) + 1, total, case)
                t0 = time.time()
                record = run_case(case, inputs, device, env, options.max_time)
                add_floor(record, floor)
                record["wall_s"] = time.time() - t0
                record["load_average_1m"] = os.getloadavg()[0]  # a shared machine's other work shows here
                records.append(record)
    except KeyboardInterrupt as exc:
        interrupted = f"interrupted ({exc or 'KeyboardInterrupt'}) after {len(records)} of {total} cases"
    finally:
        cache.clear()
    compute_ratios(records)
    return {
        "schema": SCHEMA,
        "env": env,
        "command": command_line(sys.argv),
        "options": {"max_time_s": options.max_time},
        "wall_s": time.time() - started,
        "suites": sorted({g.suite for g in groups}),
        "interrupted": interrupted,
        "results": records,
        "scaling": scaling(records),
    }


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")


# ---- the table ----------------------------------------------------------------------------
#
# Fitted to the terminal's width: a heading line per group, its variants below it, the speed-up
# column wrapped at word boundaries (or on lines of its own where the terminal is narrow), and why a
# case was not timed as a numbered note under the table (one note per distinct reason).

MIN_WRAPPED_COLUMN = 24  # the narrowest the speed-up column wraps into before it takes lines of its own
INDENT = "  "  # variants under their group's heading
GAP = "  "  # between columns


class TableRow(NamedTuple):
    """One case's line of the terminal table, every cell text."""

    group: str
    variant: str
    median: str  # the status instead, for a case that was not timed
    throughput: str
    peak_memory: str
    speed_up: str  # the ratios; on CUDA, TFLOP/s and MFU after them
    reason: str  # why it was not timed: a note under the table


TABLE_HEADER = TableRow("", "variant", "median", "throughput", "peak mem", "speed-up", "")


def format_record(r: dict) -> TableRow:
    if r["status"] != "ok":
        return TableRow(r["group"], r["variant"], r["status"], "", "", "", r["reason"] or "")
    ratios = ", ".join(f"x{x:.2f} vs {name}" for name, x in r["ratios"].items())
    speed_up = ratios or ("(baseline)" if r["role"] == "baseline" else "")
    if r["tflops"] is not None and r["device"] == "cuda":
        note = f"{r['tflops']:.1f} TFLOP/s" + (f", MFU {100 * r['mfu']['value']:.1f}%" if r["mfu"] else "")
        speed_up = f"{speed_up}; {note}" if speed_up else note
    if r.get("fraction_of_floor"):
        note = f"{r['fraction_of_floor']:.2f}x its floor ({r['floor']['bound']})"
        speed_up = f"{speed_up}; {note}" if speed_up else note
    return TableRow(r["group"], r["variant"], format_time(r["time"]["median_s"]),
                    format_rate(r["throughput"]["value"], r["throughput"]["unit"]), format_bytes(r["memory"]["peak_bytes"]),
                    speed_up, "")


def _wrap(text: str, width: int, indent: str = "", subsequent: str | None = None) -> list[str]:
    """text's lines at most `width` wide, broken between words only (a word wider than that stays whole)."""
    import textwrap

    return textwrap.wrap(text, max(1, width), initial_indent=indent,
                         subsequent_indent=indent if subsequent is None else subsequent,
                         break_long_words=False, break_on_hyphens=False) or [indent.rstrip()]


def _longest_word(cells) -> int:
    return max((len(word) for cell in cells for word in cell.split()), default=0)


def _table_lines(rows: list[TableRow], width: int) -> list[str]:
    """The table: the header, then each group's heading and its variants' rows."""
    timed = [TABLE_HEADER, *(row for row in rows if not row.reason)]  # a status (skipped [1]) spans the columns
    widths = [max(len(row[i]) for row in (timed if i > 1 else [TABLE_HEADER, *rows])) for i in range(1, 5)]
    last = [row.speed_up for row in [TABLE_HEADER, *rows]]
    used = len(INDENT) + sum(widths) + len(GAP) * len(widths)
    room = width - used
    if used > width:  # narrower than the fixed columns: each case's cells run on as wrapped text
        def render(row):
            return _wrap(GAP.join(c for c in row[1:6] if c), width, INDENT, INDENT * 3)
    elif room >= max(map(len, last)) or room >= max(MIN_WRAPPED_COLUMN, _longest_word(last)):
        def render(row):  # the speed-up in its column, wrapped there where it must be
            head = INDENT + GAP.join(c.ljust(w) for c, w in zip(row[1:5], widths)) + GAP
            wrapped = _wrap(row.speed_up, room) if row.speed_up else [""]
            return [(head if i == 0 else " " * len(head)) + part for i, part in enumerate(wrapped)]
    else:
        def render(row):  # the speed-up on lines of its own below the row
            head = INDENT + GAP.join(c.ljust(w) for c, w in zip(row[1:5], widths))
            return [head, *(_wrap(row.speed_up, width, INDENT * 3) if row.speed_up else [])]
    if used <= width:
        timed_render = render

        def render(row):
            if not row.reason:
                return timed_render(row)
            return [INDENT + row.variant.ljust(widths[0]) + GAP + row.median]

    lines = [line.rstrip() for line in render(TABLE_HEADER)]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines.extend(_wrap(group, width))
        lines.extend(line.rstrip() for line in render(row))
    return lines


def format_table(report: dict, width: int | None = None) -> str:
    """The terminal table of a report, no line wider than `width` (default: the terminal's) unless a
    single word is; long cells are wrapped between words, never cut."""
    if width is None:
        import shutil

        width = shutil.get_terminal_size().columns
    notes: dict[str, int] = {}  # reason -> its number under the table
    rows = []
    for r in report["results"]:
        row = format_record(r)
        if row.reason:
            mark = notes.setdefault(row.reason, len(notes) + 1)
            row = row._replace(median=f"{row.median} [{mark}]")
        rows.append(row)
    lines = _table_lines(rows, width)
    if notes:
        lines.append("")
        for reason, mark in notes.items():
            label = f"[{mark}] "
            lines.extend(_wrap(reason, width, label, " " * len(label)))
    env = report["env"]
    lines.append("")
    isa = f", {' '.join(env['cpu_isa_flags'])}" if env.get("cpu_isa_flags") else ""
    load = f", load average {env['load_average_1m']:.2f} at the start" if env.get("load_average_1m") is not None else ""
    lines.extend(_wrap(f"{env['device_name']} ({env['device_type']}{isa}, {env['torch_threads']} threads{load}), "
                       f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}. "
                       "speed-up = baseline median / this median.", width))
    if any(r.get("fraction_of_floor") for r in report["results"]):
        lines.extend(_wrap("floor = the least time the case's reads, writes and exps take at the read, write and exp "
                           "rates this machine showed next to it (memk's kernel probes, bench/roofline.py); "
                           "1.00x is at the floor.", width))
    if report["scaling"]:
        lines.append("time ~ size^k over the swept size:")
        for s in report["scaling"]:
            lines.extend(_wrap(f"{s['suite']}/{s['family']} {s['variant']}: k = {s['exponent']:.2f} over {s['axis']}",
                               width, INDENT, INDENT * 2))
    return "\n".join(lines)
