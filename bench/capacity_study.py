"""The capacity study (issue 21): why memk measured 2.3 bits/param where the paper measures 3.6.

    python -m memk.bench.capacity_study list
    python -m memk.bench.capacity_study run ARM [ARM ...] --out DIR
    python -m memk.bench.capacity_study collect --out DIR --results bench/results/capacity-study

An arm is one question asked of memk: a capacity experiment (models, dataset sizes, a
training recipe, a precision) trained with the plateau rule off, so each run's bits curve
shows memorized bits against steps up to the arm's step cap. Each arm trains through
`memk.memorize.experiments.capacity.run_capacity` into DIR/ARM, so rerunning the same command resumes
it (finished runs kept, the run in progress continued from its checkpoint). `collect`
copies each finished arm's rows (curves included, checkpoints not) and summary into the
results folder with the machine, CPU model, load and date; docs/capacity-study.md is
written from those files (`python -m memk.bench.capacity_study_report`).

Run each arm process with one torch thread (MEMK_NUM_THREADS=1), one process per core.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click
import torch

from memk.memorize.experiments.capacity import CapacityExperiment, run_capacity
from memk.memorize.bits import uniform_sequence_entropy_bits
from memk.memorize.constants import PAPER_ALPHA
from memk.memorize.model import GPTConfig, count_parameters
from memk.memorize.schedule import TrainConfig
from memk.memorize.runs.sweep import LocalExecutor


@dataclass(frozen=True)
class Arm:
    question: str  # what the arm varies, in a line
    experiment: CapacityExperiment


def gpt(n_layer: int, d_model: int, vocab_size: int, seq_len: int, n_head: int | None = None) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head or max(1, d_model // 16),
                     vocab_size=vocab_size, seq_len=seq_len)


def curve_recipe(steps: int, **changes) -> TrainConfig:
    """memk's default recipe until 2026-12 (lr 1e-2, 100 warm-up steps, clip 1.0, β (0.9, 0.98),
    weight decay 0, a 20% linear cool-down), run to `steps` with the plateau rule off
    (min_steps = max_steps), evaluated every 100 steps."""
    base = TrainConfig(lr=1e-2, warmup_steps=100, batch_size=64, grad_clip=1.0, max_steps=steps,
                       cooldown_steps=steps // 5, min_steps=steps, eval_every=100)
    return replace(base, **changes)


def arm(question: str, models, sizes, train: TrainConfig, precision: str = "float32") -> Arm:
    return Arm(question, CapacityExperiment(models=tuple(models), train=train, precisions=(precision,),
                                            dataset_sizes=tuple(sizes), device="cpu"))


# The recipe arms: the default's smallest model (1x8, 1,656 parameters) on 64 sequences of
# V 64, S 32 (11,904 bits, about twice what it stores), 20,000 steps each.
TINY = gpt(1, 8, 64, 32, n_head=1)
RECIPE = 20_000
ARMS: dict[str, Arm] = {
    "recipe-base": arm("memk's recipe until 2026-12", [TINY], [64], curve_recipe(RECIPE)),
    "recipe-noclip": arm("gradient clipping off", [TINY], [64], curve_recipe(RECIPE, grad_clip=0.0)),
    "recipe-lr3e-2": arm("learning rate 3e-2", [TINY], [64], curve_recipe(RECIPE, lr=3e-2)),
    "recipe-lr3e-3": arm("learning rate 3e-3", [TINY], [64], curve_recipe(RECIPE, lr=3e-3)),
    "recipe-lr1e-3": arm("learning rate 1e-3", [TINY], [64], curve_recipe(RECIPE, lr=1e-3)),
    "recipe-beta2-999": arm("Adam β2 0.999", [TINY], [64], curve_recipe(RECIPE, betas=(0.9, 0.999))),
    "recipe-wd0.1": arm("weight decay 0.1", [TINY], [64], curve_recipe(RECIPE, weight_decay=0.1)),
    "recipe-warmup0": arm("no warm-up", [TINY], [64], curve_recipe(RECIPE, warmup_steps=0)),
    "recipe-warmup2000": arm("2,000 warm-up steps", [TINY], [64], curve_recipe(RECIPE, warmup_steps=2000)),
    "recipe-nocooldown": arm("no cool-down", [TINY], [64], curve_recipe(RECIPE, cooldown_steps=0)),
    "recipe-cooldown50": arm("a 50% cool-down", [TINY], [64], curve_recipe(RECIPE, cooldown_steps=RECIPE // 2)),
    "recipe-batch16": arm("batch 16 (a quarter of the data per step)", [TINY], [64], curve_recipe(RECIPE, batch_size=16)),
    "recipe-n32": arm("half the data (32 sequences, about capacity)", [TINY], [32], curve_recipe(RECIPE)),
    "recipe-n128": arm("twice the data (128 sequences), full batch", [TINY], [128],
                       curve_recipe(RECIPE, batch_size=128)),
    "recipe-lr3e-2-beta2-999": arm("learning rate 3e-2 and Adam β2 0.999", [TINY], [64],
                                   curve_recipe(RECIPE, lr=3e-2, betas=(0.9, 0.999))),
    # The paper's 1x32 model (80,352 parameters) at V 2048, S 64: a short look at the learning rate.
    "paper1x32-lr3e-2-probe": arm("1x32 V2048: lr 3e-2, 2,000 steps", [gpt(1, 32, 2048, 64, 1)], [490],
                                  curve_recipe(2000, lr=3e-2, cooldown_steps=0)),
    "paper1x32-lr1e-2-probe": arm("1x32 V2048: lr 1e-2, 2,000 steps", [gpt(1, 32, 2048, 64, 1)], [490],
                                  curve_recipe(2000, cooldown_steps=0)),
    "paper1x32-lr3e-3-probe": arm("1x32 V2048: lr 3e-3, 2,000 steps", [gpt(1, 32, 2048, 64, 1)], [490],
                                  curve_recipe(2000, lr=3e-3, cooldown_steps=0)),
    "paper1x32-lr1e-3-probe": arm("1x32 V2048: lr 1e-3, 2,000 steps", [gpt(1, 32, 2048, 64, 1)], [490],
                                  curve_recipe(2000, lr=1e-3, cooldown_steps=0)),
}


def sized(model: GPTConfig, factor: float) -> int:
    """Sequences holding `factor` times the bits the model stores at the paper's 3.6 bits/param."""
    return max(1, round(factor * PAPER_ALPHA * count_parameters(model) / uniform_sequence_entropy_bits(
        model.vocab_size, model.seq_len)))


# The shape arms: one-layer models from the default's regime (V 64, S 32) to the paper's (V 2048,
# S 64), each on a dataset of 1.25x the bits it would store at 3.6 bits/param, 10,000 steps.
SHAPE = 10_000
for _v, _s, _ds in ((64, 32, (8, 16, 32, 64)), (256, 32, (8, 16, 32)), (2048, 32, (8, 16)), (2048, 64, (8, 16)),
                    (64, 64, (16,))):
    for _d in _ds:
        _m = gpt(1, _d, _v, _s)
        ARMS[f"shape-1x{_d}-V{_v}-S{_s}"] = arm(f"1x{_d} at V {_v}, S {_s}", [_m], [sized(_m, 1.25)], curve_recipe(SHAPE))
for _v, _s in ((64, 32), (2048, 64)):
    _m = gpt(2, 16, _v, _s)
    ARMS[f"shape-2x16-V{_v}-S{_s}"] = arm(f"2x16 at V {_v}, S {_s}", [_m], [sized(_m, 1.25)], curve_recipe(SHAPE))
# Precision on the default's models: bfloat16 weights (the paper's) and autocast; float32 is the shape arm.
for _d in (8, 16, 32):
    _m = gpt(1, _d, 64, 32)
    for _p in ("bfloat16", "bfloat16-autocast"):  # float32: the shape arm of the same model
        ARMS[f"precision-1x{_d}-V64-S32-{_p}"] = arm(f"1x{_d} at V 64, S 32 in {_p}", [_m], [sized(_m, 1.25)],
                                                     curve_recipe(SHAPE), precision=_p)

# The optimization budget: 200,000 steps at batch 16 (ten times the recipe arms' steps at a quarter
# of their rows), for the default's smallest model and for a model of the paper's regime (V 2048, S 64)
# of the same width, each on 1.25x the bits it would store at 3.6 bits/param.
BUDGET = 200_000
for _m in (TINY, gpt(1, 8, 2048, 64, 1)):
    ARMS[f"budget-1x8-V{_m.vocab_size}-S{_m.seq_len}-batch16"] = arm(
        f"1x8 at V {_m.vocab_size}, S {_m.seq_len}: 200,000 steps at batch 16", [_m], [sized(_m, 1.25)],
        replace(curve_recipe(BUDGET, batch_size=16), eval_every=250))
# The same model with the learning rate decaying linearly to 0 over the whole run after the
# warm-up (the schedule of Hugging Face's Trainer by default), 60,000 steps.
_m = gpt(1, 8, 2048, 64, 1)
ARMS["budget-1x8-V2048-S64-batch16-decay"] = arm(
    "1x8 at V 2048, S 64: 60,000 steps at batch 16, linear decay over the run", [_m], [sized(_m, 1.25)],
    replace(curve_recipe(60_000, batch_size=16, cooldown_steps=59_900), eval_every=250))

# The paper's 1x32 model at V 2048, S 64 (paper: 4.23 bits/param in float32, 3.93 in bfloat16), on
# about its capacity at 4.23 bits/param (490 sequences of 693 bits) and twice that, 30,000 steps.
PAPER_1X32 = gpt(1, 32, 2048, 64, 1)
for _n in (490, 980):
    ARMS[f"paper1x32-float32-N{_n}"] = arm(f"the paper's 1x32 on {_n} sequences, float32", [PAPER_1X32], [_n],
                                          curve_recipe(30_000))
ARMS["paper1x32-float32-N490-decay"] = arm(
    "the paper's 1x32 on 490 sequences, float32, 20,000 steps, linear decay over the run", [PAPER_1X32], [490],
    curve_recipe(20_000, cooldown_steps=19_900))
ARMS["paper1x32-bfloat16-N490"] = arm("the paper's 1x32 on 490 sequences, bfloat16 weights", [PAPER_1X32], [490],
                                      curve_recipe(20_000), precision="bfloat16")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average": os.getloadavg(), "threads": os.environ.get("MEMK_NUM_THREADS"), "memk_commit": commit,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@click.group()
def main() -> None:
    """The capacity study's arms: list, run (resumable), collect into result files."""


@main.command("list")
def list_arms() -> None:
    for name, a in ARMS.items():
        print(f"{name:<28} {a.question}")


@main.command()
@click.argument("arms", nargs=-1, required=True)
@click.option("--out", required=True, help="folder of the arms' run folders (outside the repository)")
def run(arms: tuple[str, ...], out: str) -> None:
    """Train ARMS one after another into OUT/ARM; the same command again resumes."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise click.UsageError(f"unknown arm(s) {', '.join(unknown)}; `list` names them")
    for name in arms:
        folder = Path(out) / name
        started = machine()
        t0 = time.perf_counter()
        run_capacity(ARMS[name].experiment, folder, progress=False, executor=LocalExecutor(torch.device("cpu")))
        (folder / "study.json").write_text(json.dumps(
            {"arm": name, "question": ARMS[name].question, "started": started, "finished": machine(),
             "wall_seconds_this_invocation": time.perf_counter() - t0,
             # DIR, not this machine's folder: the record is committed
             "command": f"MEMK_NUM_THREADS=1 python -m memk.bench.capacity_study run {name} --out DIR"}, indent=1))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def unfinished_record(folder: Path) -> dict | None:
    """An arm still training (or stopped): its runs' bits curves so far, from their checkpoints."""
    checkpoints = sorted((folder / "checkpoints").glob("*.pt")) if (folder / "checkpoints").exists() else []
    if folder.name not in ARMS or not checkpoints:
        return None
    exp = ARMS[folder.name].experiment
    runs = []
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)
        runs.append({"checkpoint": path.name, "step": state["step"], "train_seconds": state["train_seconds"],
                     "bits_curve": state["curve"], "cooldown_start": state["cooldown_start"]})
    return {"arm": folder.name, "question": ARMS[folder.name].question, "unfinished": True,
            "collected": machine(), "experiment": exp.to_dict(), "runs_in_progress": runs,
            "command": f"MEMK_NUM_THREADS=1 python -m memk.bench.capacity_study run {folder.name} --out DIR "
                       "(the same command resumes it)"}


@main.command()
@click.option("--out", required=True, help="the folder `run` wrote")
@click.option("--results", default="bench/results/capacity-study", show_default=True)
@click.option("--unfinished", is_flag=True, help="also record arms still training: their curves so far")
def collect(out: str, results: str, unfinished: bool) -> None:
    """Copy each finished arm's rows, summary and study record into RESULTS/ARM.json (and, with
    --unfinished, each unfinished arm's curves so far into RESULTS/ARM.unfinished.json)."""
    dest = Path(results)
    dest.mkdir(parents=True, exist_ok=True)
    for folder in sorted(Path(out).iterdir()):
        if not (folder / "study.json").exists() or not (folder / "summary.json").exists():
            record = unfinished_record(folder) if unfinished else None
            if record is not None:
                (dest / f"{folder.name}.unfinished.json").write_text(json.dumps(record, indent=1) + "\n")
                print(f"collected {folder.name} (unfinished)")
            continue
        (dest / f"{folder.name}.unfinished.json").unlink(missing_ok=True)
        rows = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines() if line.strip()]
        record = json.loads((folder / "study.json").read_text())
        record["command"] = record["command"].replace(f"--out {out}", "--out DIR")  # records written before that
        record["summary"] = json.loads((folder / "summary.json").read_text())
        record["rows"] = rows
        (dest / f"{folder.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"collected {folder.name}")


if __name__ == "__main__":
    main()
