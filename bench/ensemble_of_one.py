"""A run's training step alone (GPT + torch.optim.AdamW) against the same run as an ensemble of one
(EnsembleGPT of one member + EnsembleAdamW), on this machine's CPU, float32 (issue 23).

    python -m memk.bench.ensemble_of_one [--json bench/results/ensemble-of-one-cpu-2core.json] [--quick]

Whether a run alone could train as an ensemble of one without losing speed. Each side takes the
training loop's own step (forward, backward, clip by norm 1, AdamW at lr 1e-3) from the same
weights on the same random batches; the two are called in turn (so a change in the machine's load
hits both alike), warmed up, and the median of each side's step times is reported, for each
thread count. Sizes: the default capacity preset's four models (V 64, S 32, batch 64), the
paper's 1x32 (V 2048, S 64, batch 64 as the paper-1x32 preset) and two of the paper's 8-layer
models (V 2048, S 64; the paper's batch 2048 halved until a step takes under PAPER_STEP_S).

It also trains both sides a few steps from the same start and reports how far their losses and
weights drift apart: the two sum their products in different orders (baddbmm against addmm,
a stacked LayerNorm's affine apart), so they agree to float32 rounding, not bit for bit.
Run it on an idle machine; the load average before each size is recorded.
"""

from __future__ import annotations

import json
import os
import time

import click

DEFAULT_PRESET = [(1, 8, 1), (1, 16, 2), (1, 24, 2), (1, 32, 2)]  # V 64, S 32, batch 64
PAPER = [(1, 32, 1, 64), (8, 32, 1, 2048), (8, 128, 4, 2048)]  # V 2048, S 64: (layers, d, heads, batch asked)
PAPER_STEP_S = 0.5  # a step of each side at most about this long: the paper's batches are halved until it is
DRIFT_STEPS = 10


def _sides(config, batch: int, seed: int = 0):
    """(step alone, step as an ensemble of one, their losses so far), from the same weights."""
    import torch

    from memk.memorize.ensemble import EnsembleAdamW, EnsembleGPT
    from memk.memorize.model import GPT

    torch.manual_seed(seed)
    gpt = GPT(config, "sdpa", "fused")
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
    ensemble = EnsembleGPT(config, 1, "sdpa", "fused", dtype=torch.float32)
    ensemble.import_member(0, gpt.state_dict())
    ensemble_optimizer = EnsembleAdamW(ensemble, (0.9, 0.98))
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=generator) for _ in range(4)]
    rows = torch.tensor([batch])
    losses = {"alone": [], "ensemble": []}
    calls = {"alone": 0, "ensemble": 0}

    def alone():
        x = batches[calls["alone"] % len(batches)]
        calls["alone"] += 1
        loss = gpt.loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        losses["alone"].append(float(loss.detach()))

    def as_ensemble():
        x = batches[calls["ensemble"] % len(batches)]
        calls["ensemble"] += 1
        member_losses = ensemble.member_losses(x[None], rows)
        ensemble_optimizer.zero_grad()
        member_losses.sum().backward()
        ensemble_optimizer.clip_gradients([1.0])
        ensemble_optimizer.step([1e-3], [0.0], [True])
        losses["ensemble"].append(member_losses.tolist()[0])

    return gpt, ensemble, alone, as_ensemble, losses


def _interleaved_medians(steps, budget_s: float, least: int, most: int) -> list[list[float]]:
    for step in steps:
        for _ in range(3):
            step()
    times: list[list[float]] = [[] for _ in steps]
    started = time.perf_counter()
    while len(times[0]) < most and (len(times[0]) < least or time.perf_counter() - started < budget_s):
        for step, seconds in zip(steps, times):
            t = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t)
    return times


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _capped_batch(config, asked: int) -> int:
    """The paper's batch, halved until a step alone takes at most about PAPER_STEP_S (timed at 8 rows,
    scaled by rows: at these sizes the step is nearly all per-row work)."""
    _, _, alone, _, _ = _sides(config, 8)
    alone()  # warm
    t = time.perf_counter()
    alone()
    per_row = (time.perf_counter() - t) / 8
    batch = asked
    while batch > 8 and batch * per_row > PAPER_STEP_S:
        batch //= 2
    return batch


def drift(config, batch: int) -> dict:
    """Both sides trained DRIFT_STEPS steps from the same weights on the same batches: how far apart."""
    import torch

    gpt, ensemble, alone, as_ensemble, losses = _sides(config, batch, seed=1)
    for _ in range(DRIFT_STEPS):
        alone()
        as_ensemble()
    weights = ensemble.export_member(0)
    weight_diff = max(float((weights[n] - p.detach()).abs().max()) for n, p in gpt.named_parameters())
    loss_diff = [abs(a - b) for a, b in zip(losses["alone"], losses["ensemble"])]
    return {"steps": DRIFT_STEPS, "losses_identical": losses["alone"] == losses["ensemble"],
            "first_step_loss_identical": losses["alone"][0] == losses["ensemble"][0],
            "max_loss_abs_diff": max(loss_diff), "max_loss_rel_diff": max(d / a for d, a in zip(loss_diff, losses["alone"])),
            "max_weight_abs_diff": weight_diff,
            "weights_identical": all(torch.equal(weights[n], p.detach()) for n, p in gpt.named_parameters())}


def measure(config, batch: int, threads: list[int], budget_s: float, least: int) -> dict:
    import torch

    from memk.memorize.model import count_parameters

    row = {"model": config.name, "parameters": count_parameters(config), "batch": batch, "threads": {}}
    for n in threads:
        torch.set_num_threads(n)
        load = os.getloadavg()[0]
        _, _, alone, as_ensemble, _ = _sides(config, batch)
        times = _interleaved_medians([alone, as_ensemble], budget_s, least, 400)
        a, e = round(1e3 * _median(times[0]), 3), round(1e3 * _median(times[1]), 3)  # ms, as recorded
        row["threads"][str(n)] = {"alone_ms": a, "ensemble_of_one_ms": e, "ratio": round(e / a, 3),
                                  "steps_timed": len(times[0]), "load_before": load}
    torch.set_num_threads(threads[0])
    row["drift"] = drift(config, batch)
    return row


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the results here")
@click.option("--threads", default="1,2", show_default=True, help="torch thread counts, comma-separated")
@click.option("--seconds", default=6.0, show_default=True, help="time each side of a size for about this long")
@click.option("--quick", is_flag=True, help="two small sizes, short: a test of the script, not a measurement")
def main(json_path, threads, seconds, quick):
    import torch

    from memk.bench.timing import cpu_name
    from memk.memorize.model import GPTConfig

    torch.set_default_dtype(torch.float32)
    counts = [int(t) for t in threads.split(",")]
    sizes = [(GPTConfig(L, d, h, 64, 32), 64) for L, d, h in DEFAULT_PRESET]
    sizes += [(GPTConfig(L, d, h, 2048, 64), b) for L, d, h, b in PAPER]
    if quick:
        sizes, seconds = [sizes[0], sizes[4]], 0.2
    report = {"schema": "memk-ensemble-of-one/1", "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
              "torch": torch.__version__, "dtype": "float32", "backends": ["sdpa", "fused"],
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": os.getloadavg(),
              "step": "forward, backward, clip_grad_norm 1.0, AdamW lr 1e-3 betas (0.9, 0.98)",
              "statistic": f"median of interleaved steps after 3 warm-up steps each, about {seconds} s a side",
              "sizes": []}
    for config, asked in sizes:
        batch = asked if asked <= 64 else _capped_batch(config, asked)
        row = measure(config, batch, counts, seconds, least=5 if quick else 15)
        click.echo(json.dumps(row), err=True)
        report["sizes"].append(row)
    ratios = [t["ratio"] for row in report["sizes"] for t in row["threads"].values()]
    report["worst_ratio"], report["best_ratio"] = max(ratios), min(ratios)
    text = json.dumps(report, indent=1)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
    else:
        click.echo(text)


if __name__ == "__main__":
    main()
