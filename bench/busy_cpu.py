"""How memk trains when the CPU is not its own: the thread policy's calibration and the busy-CPU target.

    python -m memk.bench.busy_cpu [--json bench/results/busy-cpu-2core.json] [--quick]

1. Calibration: one training step of each model shape memk's CPU presets train, at one
   thread and at every core, on an idle machine (the best of several timed rounds). The
   FLOPs per step below which a second thread gains little is where memk's policy
   (memk.memorize.runtime.cpu_threads_for) takes one thread.
2. The target (issue 11): a short `memk run-capacity` slows by at most 3x next to two busy
   loops, and as one of three identical runs started together, against the same run
   alone. Measured for memk's policy and for torch's default (every core, pinned with
   MEMK_NUM_THREADS), one scenario after another, on the same machine.

Every figure is wall-clock on this machine; the load average before each is recorded.
Run it on an idle machine: other work skews both the calibration and the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import click

BUSY_LOOP = "while True: pass"


def _load() -> float:
    return os.getloadavg()[0]


def calibrate(shapes, batch: int, rounds: int, steps: int) -> list[dict]:
    import torch

    from memk.memorize.data import uniform_random_sequences
    from memk.memorize.model import GPT, GPTConfig, training_flops_per_sequence

    cores = len(os.sched_getaffinity(0))
    out = []
    for n_layer, d_model, n_head, vocab, seq in shapes:
        config = GPTConfig(n_layer, d_model, n_head, vocab, seq)
        row = {"model": config.name, "batch": batch,
               "flops_per_step": training_flops_per_sequence(config) * batch, "step_ms": {}}
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = GPT(config, "sdpa", "reference")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = uniform_random_sequences(batch, vocab, seq)

            def step():
                loss = model.loss(x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            for _ in range(5):
                step()
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                best = min(best, (time.perf_counter() - start) / steps)
            row["step_ms"][str(threads)] = 1e3 * best
        row["gain_of_all_cores"] = row["step_ms"]["1"] / row["step_ms"][str(cores)]
        out.append(row)
        click.echo(f"  {config.name:26s} {row['flops_per_step'] / 1e6:9.0f} MFLOP/step  "
                   + "  ".join(f"{t} thread(s) {ms:8.2f} ms" for t, ms in row["step_ms"].items())
                   + f"  gain {row['gain_of_all_cores']:.2f}x", err=True)
    return out


def _memk_run(args: list[str], env: dict, folder: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "memk.cli", "run-capacity", *args, "--out", folder, "--no-progress"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tempfile.gettempdir())


def _timed_runs(args: list[str], env: dict, copies: int, busy_loops: int) -> list[float]:
    """Wall-clock of `copies` identical runs started together, next to `busy_loops` spinning processes."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy_loops)]
    try:
        time.sleep(0.5 if loops else 0)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            procs = [_memk_run(args, env, os.path.join(tmp, f"run{i}")) for i in range(copies)]
            seconds = []
            for p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"memk run failed: {err.strip()[-300:]}")
                seconds.append(time.perf_counter() - start)
            return seconds
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def contention(args: list[str], policies: dict[str, dict]) -> list[dict]:
    out = []
    for policy, extra_env in policies.items():
        env = {**os.environ, **extra_env}
        row = {"policy": policy, "env": extra_env, "args": args}
        for scenario, copies, loops in (("alone", 1, 0), ("next to two busy loops", 1, 2), ("one of three runs", 3, 0)):
            row.setdefault("load_before", {})[scenario] = _load()
            row.setdefault("seconds", {})[scenario] = max(_timed_runs(args, env, copies, loops))
        alone = row["seconds"]["alone"]
        row["slowdown"] = {k: v / alone for k, v in row["seconds"].items() if k != "alone"}
        row["meets_3x_target"] = all(v <= 3.0 for v in row["slowdown"].values())
        out.append(row)
        click.echo(f"  {policy:28s} " + "  ".join(f"{k}: {v:6.1f} s" for k, v in row["seconds"].items())
                   + "  slowdown " + ", ".join(f"{v:.1f}x" for v in row["slowdown"].values()), err=True)
    return out


# The model shapes memk's CPU presets train (capacity default and smoke; generalization's
# text, Markov and reference models), and the paper's smallest.
SHAPES = [(1, 8, 1, 64, 32), (1, 16, 2, 64, 32), (1, 32, 2, 64, 32), (1, 8, 1, 256, 64), (1, 32, 2, 256, 64),
          (1, 8, 1, 2048, 64), (1, 16, 2, 2048, 64), (1, 32, 2, 2048, 64), (1, 64, 2, 2048, 64)]
SHORT_RUN = ["--preset", "default", "--models", "1x16", "--sizes", "200,400", "--max-steps", "800"]


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
@click.option("--quick", is_flag=True, help="fewer shapes and rounds, a shorter run: a smoke test of the script")
def main(json_path, quick):
    import torch

    from memk.bench.timing import cpu_name
    from memk.memorize.runtime import ONE_THREAD_BELOW_FLOPS, THREADS_ENV

    if json_path:  # fail now, not after minutes of measuring
        with open(json_path, "a"):
            pass
    cores = len(os.sched_getaffinity(0))
    report = {"schema": "memk-busy-cpu/1", "cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": _load(),
              "one_thread_below_flops": ONE_THREAD_BELOW_FLOPS}
    click.echo(f"calibration: one training step at batch 64 (load {report['load_before']:.2f})", err=True)
    shapes = SHAPES[:2] if quick else SHAPES
    report["calibration"] = calibrate(shapes, batch=64, rounds=2 if quick else 5, steps=5 if quick else 20)
    run = [*SHORT_RUN[:-1], "60"] if quick else SHORT_RUN
    click.echo(f"contention: memk run-capacity {' '.join(run)}", err=True)
    report["contention"] = contention(run, {"memk": {}, "every core (torch's default)": {THREADS_ENV: str(cores)}})
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        click.echo(f"wrote {json_path}", err=True)


if __name__ == "__main__":
    main()
