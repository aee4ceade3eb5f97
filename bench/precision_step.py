"""A run's training step and its bits on the CPU in each precision, and where the step's time goes (issue 25).

    python -m memk.bench.precision_step [--json bench/results/precision-step-cpu-2core.json] [--quick]

The step is the one memk's runs take (memk.memorize.train): a seeded GPT with the CPU's
default backends, memk's optimizer for the precision (torch AdamW; BFloat16AdamW for bfloat16
weights), its autocast, forward, backward, clip by norm, optimizer step. Each model below is
timed in float32, bfloat16-autocast and bfloat16 (weights) by turns in one process (medians
of many calls, so a change in load hits all alike), at the threads memk's policy gives the
run, and then profiled once per precision (torch.profiler): the ops that take the most time,
grouped into what memk owns (its log-prob kernels and the tied head) and what torch does.
The bits (memorize.bits.model_sequence_bits over BITS_SEQUENCES sequences: what every
evaluation of a run measures) are timed the same way.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict

import click
import torch

MODELS = {  # name -> (n_layer, d_model, n_head, V, S, batch): the step of ...
    "default 1x32": (1, 32, 2, 64, 32, 64),  # the default preset's largest model
    "paper 1x32": (1, 32, 1, 2048, 64, 64),  # the capacity study's paper-1x32 preset
    "4x128": (4, 128, 4, 2048, 64, 32),  # the train suite's largest CPU model (docs/benchmarks.md)
}
PRECISIONS = ("float32", "bfloat16-autocast", "bfloat16")
BITS_SEQUENCES = 1024  # a dataset of the size the default preset's runs evaluate (185 to 1,226 sequences)


def step_function(shape, precision: str):
    """One training step of a fresh seeded run of this shape and precision, as memk trains it, and
    one evaluation of its bits (over BITS_SEQUENCES random sequences); with its config, batch, backends."""
    from memk.memorize.model import GPTConfig
    from memk.memorize.precision import autocast_context, optimizer_for, weights_dtype
    from memk.memorize.runtime import resolve_backends
    from memk.memorize.train import seeded_gpt

    n_layer, d_model, n_head, vocab, seq, batch = shape
    config = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=vocab, seq_len=seq)
    device = torch.device("cpu")
    backends = resolve_backends(device, "auto", "auto")
    gpt = seeded_gpt(config, 0, backends.attention, backends.logprob, device, weights_dtype(precision))
    optimizer = optimizer_for(gpt.parameters(), precision, 1e-3, (0.9, 0.98), 0.0)
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        with autocast_context(device, precision):
            loss = gpt.loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    def bits():
        from memk.memorize.bits import model_sequence_bits

        return model_sequence_bits(gpt, dataset, precision)

    dataset = torch.randint(0, vocab, (BITS_SEQUENCES, seq), generator=torch.Generator().manual_seed(1))
    return step, bits, config, batch, backends


def interleaved_medians(steps: list, seconds: float, most: int = 400) -> list[float]:
    """Median seconds per call of each step, called in turn after three warm-up calls each."""
    for step in steps:
        for _ in range(3):
            step()
    times = [[] for _ in steps]
    started = time.perf_counter()
    while len(times[0]) < 5 or (time.perf_counter() - started < seconds and len(times[0]) < most):
        for step, spent in zip(steps, times):
            t = time.perf_counter()
            step()
            spent.append(time.perf_counter() - t)
    return [sorted(spent)[len(spent) // 2] for spent in times]


MEMK_OPS = ("memk", "TiedHead")  # memk::* kernels, their autograd nodes, the tied head


def profile(step, calls: int = 20, top: int = 12) -> dict:
    """Where a step's time goes: torch.profiler's self CPU time per op over `calls` steps, the top
    ops with their share, and the share of memk's own ops (its kernels and autograd functions)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    self_us: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        self_us[event.key] += event.self_cpu_time_total
    total = sum(self_us.values())
    ranked = sorted(self_us.items(), key=lambda kv: -kv[1])
    memk_share = sum(us for name, us in self_us.items() if any(tag in name for tag in MEMK_OPS)) / total
    return {"calls": calls, "self_cpu_ms_per_step": round(total / 1e3 / calls, 3),
            "memk_ops_share": round(memk_share, 3),
            "top_ops": [{"op": name, "ms_per_step": round(us / 1e3 / calls, 3), "share": round(us / total, 3)}
                        for name, us in ranked[:top]]}


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
@click.option("--quick", is_flag=True, help="the smallest model and a short timing: a test of the script")
@click.option("--seconds", type=float, default=20.0, show_default=True, help="timing per model, all precisions by turns")
@click.option("--no-profile", is_flag=True, help="time only")
def main(json_path, quick, seconds, no_profile):
    from memk.bench.roofline import cpu_isa_flags
    from memk.bench.timing import cpu_name
    from memk.memorize.runtime import cpu_threads_for

    report = {"schema": "memk-precision-step/1", "what": __doc__.strip().splitlines()[0],
              "cpu": cpu_name(), "isa_flags": cpu_isa_flags(), "cores": len(os.sched_getaffinity(0)),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_1_5_15_before": [round(x, 2) for x in os.getloadavg()], "models": {}}
    models = {"default 1x32": MODELS["default 1x32"]} if quick else MODELS
    for name, shape in models.items():
        built = {p: step_function(shape, p) for p in PRECISIONS}
        config, batch, backends = built["float32"][2:]
        threads = cpu_threads_for(config, batch)
        torch.set_num_threads(threads)
        medians = interleaved_medians([built[p][0] for p in PRECISIONS], 1.0 if quick else seconds)
        bits = interleaved_medians([built[p][1] for p in PRECISIONS], 1.0 if quick else seconds / 2)
        entry = {"shape": dict(zip(("n_layer", "d_model", "n_head", "vocab_size", "seq_len", "batch"), shape)),
                 "backends": backends._asdict(), "threads": threads,
                 "step_ms": {p: round(1e3 * s, 3) for p, s in zip(PRECISIONS, medians)},
                 "against_float32": {p: round(s / medians[0], 3) for p, s in zip(PRECISIONS, medians)},
                 "bits_sequences": BITS_SEQUENCES,
                 "bits_ms": {p: round(1e3 * s, 3) for p, s in zip(PRECISIONS, bits)},
                 "bits_against_float32": {p: round(s / bits[0], 3) for p, s in zip(PRECISIONS, bits)}}
        if not no_profile:
            entry["profile"] = {p: profile(built[p][0], 3 if quick else 20) for p in PRECISIONS}
        report["models"][name] = entry
        click.echo(f"{name} ({threads} thread{'s' * (threads > 1)}): "
                   + ", ".join(f"{p} {1e3 * s:.2f} ms" for p, s in zip(PRECISIONS, medians))
                   + "; bits: " + ", ".join(f"{p} {1e3 * s:.1f} ms" for p, s in zip(PRECISIONS, bits)), err=True)
        assert all(math.isfinite(built[p][0]()) for p in PRECISIONS)
    report["load_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=1) + "\n"
    if json_path:
        with open(json_path, "w") as f:
            f.write(text)
    else:
        click.echo(text)


if __name__ == "__main__":
    main()
