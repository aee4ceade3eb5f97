"""The Python pieces of bench/gpu_acceptance.sh: the environment record, the kernels' build, the
tests' per-file counts, the science stage's α, and the closing verdict on the issue's targets.

    python -m memk.bench.acceptance env --out DIR --device cuda
    python -m memk.bench.acceptance build --device cuda [--triton-interpreter]
    python -m memk.bench.acceptance clear-build-lock
    python -m memk.bench.acceptance junit-summary DIR/tests/junit.xml
    python -m memk.bench.acceptance science DIR/science/run --json DIR/science/alpha.json
    python -m memk.bench.acceptance plan --device cuda --json DIR/plan/paper.json [--preset smoke]
    python -m memk.bench.acceptance verdict DIR

The targets are benchmarks, not tests: a missed target is a FAIL row in the verdict, never a
failed stage. In CPU mode (the results' device is a CPU) the figures are computed the same way
and shown, but not judged: the targets are for an H100.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import click

# Where the script's stages write, under its output folder.
BENCH_DIR = "bench"
SCIENCE_ALPHA = "science/alpha.json"
PLAN_JSON = "plan/paper.json"
ENV_JSON = "env.json"
DEVICE_SLUG = "device-slug.txt"
VERDICT_MD = "verdict.md"

# The targets (docs/gpu.md).
BANDWIDTH_FACTOR = 1.3  # fused CE fwd+bwd within 1.3x of reading the logits twice and writing the gradient once
CE_VS_EAGER = 2.0
ATTENTION_SEQ64_VS_BEST_SDPA = 1.3
ATTENTION_SEQ1024_VS_FLASH = 0.8
ENSEMBLE_VS_ONE_AT_A_TIME = 5.0  # model-steps/s of an ensemble of 1-layer models at batch 2048 (issue 13)
PAPER_PLAN_HOURS = 24.0  # the paper preset's dry-run estimate "in hours, not days" (issue 13)


# ---- environment and build ------------------------------------------------------------------


def _nvidia_smi() -> dict | None:
    """GPU name, memory and driver from nvidia-smi, or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    gpus = []
    for line in out.stdout.strip().splitlines():
        name, memory, driver = [x.strip() for x in line.split(",")]
        gpus.append({"name": name, "memory": memory, "driver": driver})
    return {"gpus": gpus}


@click.group()
def main():
    """The pieces bench/gpu_acceptance.sh calls between its stages."""


@main.command("env")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The run's output folder.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), required=True)
def env_command(out_dir, device):
    """Write env.json (GPU, driver, torch, triton, CUDA, memk commit) and print it."""
    import torch

    from . import timing
    from .report import slug

    os.makedirs(out_dir, exist_ok=True)
    if device == "cuda" and not torch.cuda.is_available():
        click.echo("torch sees no CUDA device here; run the script's CPU mode (--cpu) on a machine without one", err=True)
        sys.exit(1)
    env = timing.environment(torch.device(device))
    env["nvidia_smi"] = _nvidia_smi()
    env["python_executable"] = sys.executable
    with open(os.path.join(out_dir, ENV_JSON), "w") as f:
        json.dump(env, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, DEVICE_SLUG), "w") as f:  # names the bench JSON files
        f.write(slug({"env": env}) + "\n")
    smi = (env["nvidia_smi"] or {}).get("gpus") or []
    for gpu in smi:
        click.echo(f"GPU: {gpu['name']}, {gpu['memory']}, driver {gpu['driver']}")
    click.echo(f"device: {env['device_name']} ({env['device_type']})"
               + (f", {env['gpu_memory_bytes'] / 2**30:.1f} GiB, compute capability {env['compute_capability']}"
                  if device == "cuda" else f", {env['cpu_count']} CPUs"))
    click.echo(f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}, "
               f"memk {env['memk_commit']}, Triton interpreter {'on' if env['triton_interpret'] else 'off'}")
    click.echo("compared libraries: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["libraries"].items()))


@main.command("build")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), required=True)
@click.option("--triton-interpreter", is_flag=True, help="On CPU, also load the Triton attention under the interpreter.")
def build_command(device, triton_interpreter):
    """Compile (or load from the cache) memk's fused log-prob kernels and its Triton attention."""
    import torch

    from memk import kernels

    failed = False
    t0 = time.time()
    try:
        kernels.logprob_ops("fused")
        click.echo(f"fused log-prob kernels ready in {time.time() - t0:.1f} s")
    except (kernels.BackendUnavailable, ValueError) as exc:
        click.echo(f"fused log-prob kernels: {exc}", err=True)
        failed = True
    if device == "cuda" or triton_interpreter:
        t0 = time.time()
        try:
            attend = kernels.packed_attention("triton")
            qkv = torch.randn(2, 64, 3 * 64, device=device)
            attend(qkv, 2)  # compiles one kernel for this shape (or runs it under the interpreter)
            click.echo(f"triton attention ready in {time.time() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001 - any failure here is the stage's failure, said in one line
            click.echo(f"triton attention: {type(exc).__name__}: {exc}", err=True)
            failed = True
    sys.exit(1 if failed else 0)


@main.command("clear-build-lock")
def clear_build_lock():
    """Remove the lock a build killed mid-way leaves in torch's extension cache (the next build would wait on it forever)."""
    from torch.utils import cpp_extension

    for name in ("memk_logprob_cpu", "memk_logprob_cuda"):
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        if lock.exists():
            lock.unlink()
            click.echo(f"removed {lock}")


# ---- the tests' counts ------------------------------------------------------------------------


def junit_counts(xml_path: str) -> dict[str, dict[str, int]]:
    """{test file: {passed, failed, errors, skipped}} from a pytest JUnit XML report."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        # pytest writes classname "tests.test_x" (or "tests.test_x.TestClass") and, with junit_family=xunit1, file
        # a collection error has an empty classname and the module in its name
        file = case.get("file") or _file_of_classname(case.get("classname") or case.get("name", ""))
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "errors"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        counts[file][outcome] += 1
    return dict(counts)


def _file_of_classname(classname: str) -> str:
    """"tests.test_x" or "tests.test_x.TestClass" -> "tests/test_x.py" (pytest's JUnit classname)."""
    parts = classname.split(".")
    for i, part in enumerate(parts):
        if part.startswith("test_") or part.endswith("_test"):
            return "/".join(parts[: i + 1]) + ".py"
    return classname


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    lines = []
    total = defaultdict(int)
    for file in sorted(counts):
        c = counts[file]
        lines.append(f"{file}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped")
        for k, v in c.items():
            total[k] += v
    lines.append(f"all: {total['passed']} passed, {total['failed']} failed, {total['errors']} errors, "
                 f"{total['skipped']} skipped")
    return "\n".join(lines)


@main.command("junit-summary")
@click.argument("xml_path", type=click.Path(dir_okay=False))
def junit_summary(xml_path):
    """One line of counts per test file, and the total."""
    if not os.path.exists(xml_path):
        click.echo(f"no JUnit report at {xml_path}: pytest did not get as far as writing it", err=True)
        sys.exit(1)
    click.echo(format_counts(junit_counts(xml_path)))


# ---- the science stage ------------------------------------------------------------------------


def science_alpha(run_dir: str) -> dict:
    """α per precision (through the origin), the bfloat16/float32 ratio and the paper's, from a
    run-capacity folder: its summary.json, or, where the run was stopped before writing it, its
    finished runs (runs.jsonl)."""
    from memk.memorize.experiments import capacity
    from memk.memorize.constants import PAPER_ALPHA_BY_PRECISION

    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        source = "summary.json"
    else:
        rows_path = os.path.join(run_dir, "runs.jsonl")
        rows = []
        if os.path.exists(rows_path):
            with open(rows_path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise click.ClickException(f"{run_dir} holds no finished run (no summary.json, no rows in runs.jsonl)")
        summary = capacity.summarize(rows)
        source = f"runs.jsonl ({len(rows)} finished runs; the run was stopped before its summary)"
    alpha = {p: block["fit"]["through_origin"]["alpha"] for p, block in summary["precisions"].items()}
    out = {
        "source": source,
        "alpha": alpha,
        "models": {p: [{k: m[k] for k in ("model_name", "parameters", "capacity_bits", "bits_per_parameter", "plateau_seen")}
                       for m in block["models"]] for p, block in summary["precisions"].items()},
        "paper_alpha": dict(PAPER_ALPHA_BY_PRECISION),
        "paper_ratio": PAPER_ALPHA_BY_PRECISION["bfloat16"] / PAPER_ALPHA_BY_PRECISION["float32"],
        "ratio": alpha["bfloat16"] / alpha["float32"] if "bfloat16" in alpha and "float32" in alpha else None,
    }
    return out


def format_science(result: dict) -> str:
    lines = [f"α through the origin (bits/parameter), from {result['source']}:"]
    for precision, a in sorted(result["alpha"].items()):
        models = result["models"][precision]
        lines.append(f"  {precision}: {a:.3f} over {len(models)} models "
                     f"({sum(m['plateau_seen'] for m in models)} with the plateau seen); "
                     f"paper {result['paper_alpha'].get(precision, '–')}")
    ratio = result["ratio"]
    lines.append(f"  bfloat16/float32: {ratio:.3f}" if ratio is not None else "  bfloat16/float32: needs both precisions")
    lines.append(f"  paper: {result['paper_alpha']['bfloat16']} / {result['paper_alpha']['float32']} = {result['paper_ratio']:.3f}")
    return "\n".join(lines)


@main.command("science")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "json_path", default=None, help="Also write the figures to this JSON file.")
def science_command(run_dir, json_path):
    """α per precision and the bfloat16/float32 ratio, next to the paper's 3.51 / 3.83."""
    result = science_alpha(run_dir)
    click.echo(format_science(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if result["ratio"] is None:
        sys.exit(1)


@main.command("plan")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), required=True)
@click.option("--preset", default="paper", show_default=True, help="the capacity preset to plan (smoke: a test)")
@click.option("--json", "json_path", required=True, type=click.Path(dir_okay=False), help="write the estimate here")
def plan_command(device, preset, json_path):
    """`memk run-capacity --preset PRESET --dry-run` on this device: the plan, and its wall-clock
    estimate at the step caps as planned (--ensemble auto, --workers auto) and one run at a time."""
    from memk.memorize.experiments import capacity, dry_run

    exp = capacity.preset(preset)
    exp = type(exp)(**{**vars(exp), "device": device})
    started = time.perf_counter()
    estimate = dry_run.capacity_estimate(exp, "auto", "auto")
    click.echo(estimate.text)
    result = {"preset": preset, "device": device, "planned_s": estimate.planned_s,
              "one_at_a_time_s": estimate.one_at_a_time_s, "probe_s": round(time.perf_counter() - started, 1),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "text": estimate.text}
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


# ---- the verdict -----------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    figure: str
    status: str  # PASS, FAIL, reported (no target to judge), n/a (not measured), cpu (CPU mode: not judged)


def load_bench_results(bench_dir: str) -> tuple[list[dict], dict | None]:
    """Every result of the bench JSON files in a folder, and the environment of the first."""
    results, env = [], None
    for path in sorted(glob.glob(os.path.join(bench_dir, "*.json"))):
        with open(path) as f:
            report = json.load(f)
        if not str(report.get("schema", "")).startswith("memk-bench/"):
            continue
        env = env or report["env"]
        results += report["results"]
    return results, env


def _not_measured(record: dict | None, what: str) -> str:
    if record is None:
        return f"not measured: no {what} in the results"
    return f"not measured: {what} {record['status']}" + (f" ({record['reason']})" if record.get("reason") else "")


def _judge(ok: bool, judged: bool) -> str:
    return ("PASS" if ok else "FAIL") if judged else "cpu"


def _largest_group(records: list[dict]) -> list[dict]:
    """The records of the group with the largest swept size among `records`."""
    if not records:
        return []
    top = max(r["sweep"]["value"] for r in records)
    return [r for r in records if r["sweep"]["value"] == top]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def cross_entropy_rows(results: list[dict], device_name: str, judged: bool) -> list[Row]:
    from .timing import peak_bandwidth

    group = _largest_group([r for r in results if r["suite"] == "logprob" and r["params"].get("op") == "cross_entropy"
                            and r["params"].get("pass") == "fwd+bwd" and r["params"].get("vocab") == 2048
                            and r["dtype"] == "bfloat16"])
    memk = next((r for r in group if r["variant"].startswith("memk:")), None)
    n = group[0]["params"]["tokens"] if group else 131072
    label = f"fused cross-entropy fwd+bwd, N {n:,}, V 2048, bfloat16"
    if memk is None or memk["status"] != "ok":
        reason = _not_measured(memk, "memk's fused cross-entropy")
        return [Row(f"{label}: {t}", reason, "n/a") for t in
                ("within 1.3x of the bandwidth floor", "at least 2x eager PyTorch", "faster than torch.compile",
                 "faster than Liger-Kernel")]
    median = memk["time"]["median_s"]
    rows = []
    peak = peak_bandwidth(device_name)
    if peak is None:
        rows.append(Row(f"{label}: within {BANDWIDTH_FACTOR}x of the bandwidth floor",
                        f"{_ms(median)}; no datasheet bandwidth for {device_name}", "n/a"))
    else:
        floor = 3 * n * 2048 * 2 / peak.bytes_per_s  # read the bf16 logits twice, write the gradient once
        rows.append(Row(f"{label}: within {BANDWIDTH_FACTOR}x of the bandwidth floor",
                        f"{_ms(median)} = {median / floor:.2f}x the floor {_ms(floor)} ({peak.source})",
                        _judge(median / floor <= BANDWIDTH_FACTOR, judged)))
    by_variant = {r["variant"]: r for r in group}
    for name, target, threshold, strict in (
        ("F.cross_entropy", f"at least {CE_VS_EAGER:g}x eager PyTorch", CE_VS_EAGER, False),
        ("F.cross_entropy (compile)", "faster than torch.compile", 1.0, True),
        ("liger:cross_entropy", "faster than Liger-Kernel", 1.0, True),
    ):
        ratio = memk["ratios"].get(name)
        if ratio is None:
            rows.append(Row(f"{label}: {target}", _not_measured(by_variant.get(name), name), "n/a"))
        else:
            ok = ratio > threshold if strict else ratio >= threshold
            rows.append(Row(f"{label}: {target}", f"{ratio:.2f}x {name} ({_ms(median)})", _judge(ok, judged)))
    return rows


def attention_rows(results: list[dict], judged: bool) -> list[Row]:
    attention = [r for r in results if r["suite"] == "attention" and r["params"].get("pass") == "fwd+bwd"]
    # bfloat16 where measured (GPU); the CPU mode runs float32 (Triton's interpreter gets bfloat16 wrong)
    dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in attention) or not attention else attention[0]["dtype"]
    # the long sequence: 1024 on a GPU, shorter in the CPU mode
    long_seq = max((r["params"]["seq"] for r in attention if r["params"].get("seq", 0) > 64), default=1024)
    rows = []
    for seq, head_dim in ((64, 32), (64, 64), (long_seq, 64)):
        group = [r for r in attention if r["params"].get("seq") == seq and r["params"].get("head_dim") == head_dim
                 and r["dtype"] == dtype]
        memk = next((r for r in group if r["variant"] == "memk:triton"), None)
        if seq == 64:
            target = f"Triton attention fwd+bwd, seq 64, head_dim {head_dim}, {dtype}: at least " \
                     f"{ATTENTION_SEQ64_VS_BEST_SDPA}x the best SDPA backend"
        else:
            target = f"Triton attention fwd+bwd, seq {seq}, head_dim 64, {dtype}: at least " \
                     f"{ATTENTION_SEQ1024_VS_FLASH}x SDPA's flash backend"
        if memk is None or memk["status"] != "ok" or not memk["ratios"]:
            rows.append(Row(target, _not_measured(memk, "memk's triton attention"), "n/a"))
            continue
        if seq == 64:
            best_name = min(memk["ratios"], key=memk["ratios"].get)  # the fastest baseline gives the smallest ratio
            ratio = memk["ratios"][best_name]
            rows.append(Row(target, f"{ratio:.2f}x {best_name}, the fastest SDPA backend here",
                            _judge(ratio >= ATTENTION_SEQ64_VS_BEST_SDPA, judged)))
        else:
            ratio = memk["ratios"].get("sdpa:flash_attention")
            if ratio is None:
                flash = next((r for r in group if r["variant"] == "sdpa:flash_attention"), None)
                rows.append(Row(target, _not_measured(flash, "sdpa:flash_attention"), "n/a"))
            else:
                rows.append(Row(target, f"{ratio:.2f}x sdpa:flash_attention",
                                _judge(ratio >= ATTENTION_SEQ1024_VS_FLASH, judged)))
    return rows


def train_rows(results: list[dict], judged: bool) -> list[Row]:
    rows = []
    train = [r for r in results if r["suite"] == "train" and not _is_ensemble(r)]
    for key in dict.fromkeys(r["group"] for r in train):
        group = [r for r in train if r["group"] == key]
        name = group[0]["params"].get("name", key)
        best_by_dtype = {}
        for dtype in ("float32", "bfloat16"):
            reference = f"sdpa+reference {dtype}"
            memk = [r for r in group if r["dtype"] == dtype and r["status"] == "ok"
                    and not r["variant"].startswith("sdpa+reference") and reference in r["ratios"]]
            target = f"training step of {name}, {dtype}: memk's backends faster than plain PyTorch"
            if not memk:
                rows.append(Row(target, "not measured: no memk variant ran in this dtype", "n/a"))
                continue
            best = max(memk, key=lambda r: r["ratios"][reference])
            best_by_dtype[dtype] = best
            compiled = best["ratios"].get(f"{reference} (compile)")
            figure = f"{best['variant']}: {best['ratios'][reference]:.2f}x eager" + (
                f", {compiled:.2f}x torch.compile" if compiled is not None else ", torch.compile not measured")
            rows.append(Row(target, figure, _judge(best["ratios"][reference] > 1.0, judged)))
        if len(best_by_dtype) == 2:
            f32, bf16 = best_by_dtype["float32"], best_by_dtype["bfloat16"]
            rows.append(Row(f"training step of {name}: bfloat16 against float32 (memk's fastest of each)",
                            f"bfloat16 {_ms(bf16['time']['median_s'])}, float32 {_ms(f32['time']['median_s'])}: "
                            f"{f32['time']['median_s'] / bf16['time']['median_s']:.2f}x", "reported"))
    if not rows:
        rows.append(Row("training step of the paper's sizes: memk's backends faster than plain PyTorch",
                        "not measured: no train results", "n/a"))
    return rows


def _is_ensemble(record: dict) -> bool:
    return record["family"].startswith("ensemble step")


def ensemble_rows(results: list[dict], judged: bool) -> list[Row]:
    """Per model and dtype, at the largest K measured: the ensemble's model-steps/s over one at a time."""
    from .suite_ensemble import ENSEMBLE, ENSEMBLE_COMPILED, ENSEMBLE_GRAPHED, ONE_AT_A_TIME

    rows = []
    ensembles = [r for r in results if r["suite"] == "train" and _is_ensemble(r)]
    for family in dict.fromkeys(r["family"] for r in ensembles):
        group = _largest_group([r for r in ensembles if r["family"] == family])
        first = group[0]
        target = (f"{first['params']['members']} runs of {first['params']['name']} at batch {first['params']['batch']}, "
                  f"{first['dtype']}: an ensemble at least {ENSEMBLE_VS_ONE_AT_A_TIME:g}x the model-steps/s of one at a time")
        measured = [r for r in group if r["variant"] in (ENSEMBLE, ENSEMBLE_COMPILED, ENSEMBLE_GRAPHED)
                    and r["status"] == "ok"
                    and ONE_AT_A_TIME in r["ratios"]]
        if not measured:
            ensemble = next((r for r in group if r["variant"] == ENSEMBLE), None)
            rows.append(Row(target, _not_measured(ensemble, "the ensemble"), "n/a"))
            continue
        parts = [f"{r['variant']} {r['ratios'][ONE_AT_A_TIME]:.2f}x ({r['throughput']['value']:.4g} model-steps/s)"
                 for r in measured]
        best = max(r["ratios"][ONE_AT_A_TIME] for r in measured)
        rows.append(Row(target, ", ".join(parts), _judge(best >= ENSEMBLE_VS_ONE_AT_A_TIME, judged)))
    return rows


def linear_rows(results: list[dict]) -> list[Row]:
    """memk against the libraries that fuse the classifier matmul (no target: reported)."""
    group = _largest_group([r for r in results if r["suite"] == "logprob"
                            and r["params"].get("op") == "linear_cross_entropy" and r["dtype"] == "bfloat16"])
    memk = next((r for r in group if r["variant"].startswith("linear+memk:")), None)
    if memk is None or memk["status"] != "ok":
        return [Row("classifier matmul + cross-entropy, bfloat16 (against cut-cross-entropy)",
                    _not_measured(memk, "memk's linear+cross-entropy"), "n/a")]
    d = memk["params"]["d_model"]
    parts = [f"{x:.2f}x {name}" for name, x in memk["ratios"].items()]
    missing = [r["variant"] for r in group if r["role"] == "baseline" and r["status"] != "ok"]
    return [Row(f"classifier matmul + cross-entropy fwd+bwd, N {memk['params']['tokens']:,}, d {d}, bfloat16",
                ", ".join(parts) + (f" (not measured: {', '.join(missing)})" if missing else ""), "reported")]


def science_rows(alpha: dict | None) -> list[Row]:
    if alpha is None:
        return [Row("capacity slice (V 2048, S 64): α per precision and bfloat16/float32", "not measured", "n/a")]
    a = alpha["alpha"]
    figure = ", ".join(f"α {p} {v:.2f}" for p, v in sorted(a.items()))
    if alpha["ratio"] is not None:
        figure += f", ratio {alpha['ratio']:.3f}"
    figure += (f" (paper {alpha['paper_alpha']['bfloat16']} / {alpha['paper_alpha']['float32']} = "
               f"{alpha['paper_ratio']:.3f})")
    return [Row("capacity slice (V 2048, S 64): α per precision and bfloat16/float32", figure, "reported")]


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def plan_rows(plan: dict | None, judged: bool) -> list[Row]:
    target = f"`paper` preset: the dry run's estimate at the step caps within {PAPER_PLAN_HOURS:g} h (hours, not days)"
    if plan is None:
        return [Row(target, "not measured", "n/a")]
    figure = (f"{plan['preset']} preset: {_duration(plan['planned_s'])} as planned, "
              f"{_duration(plan['one_at_a_time_s'])} one run at a time (probes took {plan['probe_s']:g} s)")
    return [Row(target, figure, _judge(plan["planned_s"] <= PAPER_PLAN_HOURS * 3600, judged and plan["preset"] == "paper"))]


def verdict_rows(out_dir: str) -> tuple[list[Row], dict | None]:
    results, env = load_bench_results(os.path.join(out_dir, BENCH_DIR))
    judged = env is not None and env["device_type"] == "cuda"
    device_name = env["device_name"] if env else "unknown device"
    alpha, plan = (_read_json(os.path.join(out_dir, name)) for name in (SCIENCE_ALPHA, PLAN_JSON))
    rows = (cross_entropy_rows(results, device_name, judged) + attention_rows(results, judged)
            + train_rows(results, judged) + ensemble_rows(results, judged) + plan_rows(plan, judged)
            + linear_rows(results) + science_rows(alpha))
    return rows, env


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def format_verdict(rows: list[Row], env: dict | None) -> str:
    if env is None:
        head = "No bench results: every benchmark target is unmeasured."
    elif env["device_type"] == "cuda":
        head = f"Targets on {env['device_name']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}):"
    else:
        head = (f"CPU mode on {env['device_name']}: the figures are computed as on a GPU (Triton under its "
                "interpreter) but not judged; the targets are for an H100.")
    lines = [head, "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {r.target} | {r.figure.replace('|', '/')} | {r.status} |" for r in rows]
    return "\n".join(lines)


@main.command("verdict")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
def verdict_command(out_dir):
    """The issue's targets, the measured figure, and PASS or FAIL, from the run's output folder (also verdict.md)."""
    rows, env = verdict_rows(out_dir)
    text = format_verdict(rows, env)
    with open(os.path.join(out_dir, VERDICT_MD), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "verdict.json"), "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
        f.write("\n")
    click.echo(text)


if __name__ == "__main__":
    main()
