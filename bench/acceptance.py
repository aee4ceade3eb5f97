"""The commands bench/gpu_acceptance.sh runs between its stages: the environment record, the
kernels' build, the tests' counts, the science stage's α, the paper preset's plan, the verdict.

    python -m memk.bench.acceptance env --out DIR --device cuda
    python -m memk.bench.acceptance build --device cuda [--triton-interpreter]
    python -m memk.bench.acceptance clear-build-lock
    python -m memk.bench.acceptance junit-summary DIR/tests/junit.xml
    python -m memk.bench.acceptance science DIR/science/run --json DIR/science/alpha.json
    python -m memk.bench.acceptance plan --device cuda --json DIR/plan/paper.json [--preset smoke]
    python -m memk.bench.acceptance verdict DIR

What the commands compute lives beside them: the counts in acceptance_junit.py, α in
acceptance_science.py, the targets and the verdict in acceptance_verdict.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict

import click

from .acceptance_junit import format_counts, junit_counts
from .acceptance_science import format_science, science_alpha
from .acceptance_verdict import DEVICE_SLUG, ENV_JSON, VERDICT_MD, format_verdict, verdict_rows


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
    """Remove the marker a build killed mid-way leaves in memk's build folders (torch's next build
    would wait on it forever), under memk's own build lock, as memk's build does itself."""
    from memk.kernels import native_build

    for with_cuda in (False, True):
        folder = native_build.build_directory(with_cuda)
        baton = folder / "lock"
        if baton.exists():
            with native_build.build_lock(folder):
                native_build.remove_stale_baton(folder)
            click.echo(f"removed {baton}" if not baton.exists() else f"{baton} is still held")


# ---- the tests' counts, α, the plan and the verdict -----------------------------------


@main.command("junit-summary")
@click.argument("xml_path", type=click.Path(dir_okay=False))
def junit_summary(xml_path):
    """One line of counts per test file, and the total."""
    if not os.path.exists(xml_path):
        click.echo(f"no JUnit report at {xml_path}: pytest did not get as far as writing it", err=True)
        sys.exit(1)
    click.echo(format_counts(junit_counts(xml_path)))


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
