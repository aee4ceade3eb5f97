"""The stacked model, its optimizer and the ensemble trainer against the single-model trainer it must reproduce.

Float64 on CPU makes the comparison tight: each member of an ensemble must end where
train_to_saturation ends the same run alone (same weights, bits curve, stop step and
reason), whatever its dataset size, seed, schedule and stop, and however the trainer
repacks or refills its slots. The executor that plans and places ensembles (memorize/runs/
ensemble_executor.py) is tested in test_ensemble_executor.py, the packing in test_packing.py.
"""

from collections import deque
from dataclasses import replace

import numpy as np
import pytest
import torch

from memk.memorize.ensemble import COMPILE_MODES, EnsembleAdamW, EnsembleGPT, EnsembleStep, compiled_losses
from memk.memorize.runs.ensemble_executor import EnsembleTrainer
from memk.memorize.runs.packing import EnsemblePlan
from memk.memorize.model import GPT, GPTConfig, parameter_shapes
from memk.memorize.runtime import Backends
from memk.memorize.runs.store import RunStore
from memk.memorize.runs.sweep import LocalExecutor
from memk.memorize.train import TrainingLoop, start_member, uniform_code_signal

from ensemble_runs import (BITS_RTOL, CPU, PARAM_ATOL, RUNS, KeepingWorkload, alone_cached,  # noqa: F401,F811
                           assert_same_as_alone, float64, memk, quiet)


# ---------------------------------------------------------------------------------------
# The stacked model and its optimizer


def test_the_stacked_parameters_are_gpts_and_members_round_trip(float64):
    config = GPTConfig(2, 16, 2, 32, 8)
    gpts = []
    for seed in range(3):
        torch.manual_seed(seed)
        gpts.append(GPT(config, "sdpa", "fused"))
    assert list(parameter_shapes(config)) == [n for n, _ in gpts[0].named_parameters()]
    assert {n: tuple(p.shape) for n, p in gpts[0].named_parameters()} == parameter_shapes(config)
    ensemble = EnsembleGPT(config, 3, "sdpa", "fused", dtype=torch.float64)
    for k, gpt in enumerate(gpts):
        ensemble.import_member(k, gpt.state_dict())
    for k, gpt in enumerate(gpts):
        exported = ensemble.export_member(k)
        assert all(torch.equal(exported[n], w) for n, w in gpt.state_dict().items())

    x = torch.randint(0, 32, (3, 5, 8))
    rows = torch.tensor([5, 2, 5])  # member 1 has two real sequences, three padding rows
    losses = ensemble.member_losses(x, rows)
    losses.sum().backward()
    for k, gpt in enumerate(gpts):
        torch.testing.assert_close(ensemble.forward(x[:, :, :-1])[k], gpt(x[k, :, :-1]), rtol=0, atol=1e-12)
        loss = gpt.loss(x[k, : rows[k]])
        loss.backward()
        assert float(losses.detach()[k]) == pytest.approx(float(loss.detach()), rel=1e-13)
        for name, p in gpt.named_parameters():  # each member's gradient is its own, padding ignored
            torch.testing.assert_close(ensemble.params[name].grad[k], p.grad, rtol=0, atol=1e-13)

    ensemble.keep_members([2, 0])
    assert ensemble.members == 2
    assert all(torch.equal(ensemble.export_member(0)[n], w) for n, w in gpts[2].state_dict().items())


def test_ensemble_adamw_is_torch_adamw_per_member_and_leaves_inactive_members_alone(float64):
    config = GPTConfig(1, 8, 1, 16, 8)
    hyper = [dict(lr=1e-2, weight_decay=0.0, clip=1.0), dict(lr=3e-3, weight_decay=0.1, clip=1e-3),
             dict(lr=5e-2, weight_decay=0.01, clip=0.0)]
    gpts, optimizers = [], []
    for seed, h in enumerate(hyper):
        torch.manual_seed(seed)
        gpts.append(GPT(config, "sdpa", "reference"))
        optimizers.append(torch.optim.AdamW(gpts[-1].parameters(), lr=h["lr"], betas=(0.9, 0.98), weight_decay=h["weight_decay"]))
    ensemble = EnsembleGPT(config, 3, "sdpa", "reference", dtype=torch.float64)
    for k, gpt in enumerate(gpts):
        ensemble.import_member(k, gpt.state_dict())
    adamw = EnsembleAdamW(ensemble, betas=(0.9, 0.98))

    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        active = [True, step < 3, True]  # member 1 stops after three steps
        for name, p in ensemble.params.items():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        frozen_before = ensemble.export_member(1), adamw.export_member(1)
        for k, (gpt, opt, h) in enumerate(zip(gpts, optimizers, hyper)):
            if active[k]:
                for name, p in gpt.named_parameters():
                    p.grad = ensemble.params[name].grad[k].clone()
                if h["clip"]:
                    torch.nn.utils.clip_grad_norm_(gpt.parameters(), h["clip"])
                opt.step()
        adamw.clip_gradients([h["clip"] for h in hyper])
        adamw.step([h["lr"] for h in hyper], [h["weight_decay"] for h in hyper], active)
        for k, gpt in enumerate(gpts):
            for name, w in gpt.state_dict().items():
                torch.testing.assert_close(ensemble.params[name][k], w, rtol=0, atol=1e-15)
        if not active[1]:  # bit for bit: weights, moments and step count
            weights, (step_count, exp_avg, exp_avg_sq) = frozen_before
            now_weights, (now_step, now_avg, now_avg_sq) = ensemble.export_member(1), adamw.export_member(1)
            assert now_step == step_count == 3
            assert all(torch.equal(weights[n], now_weights[n]) for n in weights)
            assert all(torch.equal(exp_avg[n], now_avg[n]) and torch.equal(exp_avg_sq[n], now_avg_sq[n]) for n in exp_avg)


@pytest.mark.parametrize("config", [GPTConfig(1, 8, 1, 16, 8), GPTConfig(3, 16, 4, 11, 5)], ids=lambda c: c.name)
def test_the_stacked_parameters_and_gpts_come_from_one_layer_table(config):
    # Both derive from model.gpt_layers: a layer added to, renamed in or reshaped in the table changes both.
    gpt = {n: tuple(p.shape) for n, p in GPT(config).named_parameters()}
    stacked = {n: tuple(p.shape) for n, p in EnsembleGPT(config, 3, "sdpa", "reference").params.items()}
    assert list(gpt.items()) == list(parameter_shapes(config).items())
    assert list(stacked.items()) == [(n, (3, *s)) for n, s in gpt.items()]


def test_a_run_through_the_loop_alone_or_in_a_one_slot_ensemble_ends_alike(float64):
    # The one loop (train.TrainingLoop) over its two steps: AloneStep (train_to_saturation) and EnsembleStep.
    run = RUNS[2]  # weight decay and a tight clip
    weights, outcome = alone_cached(run)
    step = EnsembleStep(run.model, 1, run.backends.attention, run.backends.logprob, run.train.betas, CPU)
    data = KeepingWorkload().training_data(run)
    ended = []
    start = lambda k: start_member(step, k, run.train, data, uniform_code_signal(data, "float32"), CPU, None,  # noqa: E731
                                   on_finish=lambda gpt, o: ended.append((gpt.state_dict(), o)))
    TrainingLoop(step, CPU, run.train.precision, deque([start])).run()
    (got_weights, got), = ended
    assert (got.steps, got.stop_reason, [s for s, _ in got.curve]) == (outcome.steps, outcome.stop_reason,
                                                                        [s for s, _ in outcome.curve])
    np.testing.assert_allclose([b for _, b in got.curve], [b for _, b in outcome.curve], rtol=BITS_RTOL)
    for name, w in weights.items():
        torch.testing.assert_close(got_weights[name], w, rtol=0, atol=PARAM_ATOL)


# ---------------------------------------------------------------------------------------
# The central check: every member as if trained alone


@pytest.mark.parametrize("repack_fraction", [0.0, 1.0], ids=["repacking", "frozen-in-place"])
def test_each_member_ends_as_the_same_run_trained_alone(tmp_path, float64, repack_fraction):
    workload = KeepingWorkload()
    plan = EnsemblePlan(RUNS, slots=len(RUNS))
    with RunStore(tmp_path, "capacity") as store:
        trainer = EnsembleTrainer(plan, workload, store, quiet(len(RUNS)), CPU, repack_fraction)
        trainer.train()
        rows = store.rows  # in the order they were recorded
    outcomes = workload.outcomes
    # The members really differ in their stops: a plateau before the cap, and two step caps.
    assert outcomes["tiny"].stop_reason == "plateau" and outcomes["tiny"].steps < 60
    assert (outcomes["small"].steps, outcomes["big"].steps) == (30, 60)
    assert_same_as_alone(workload, RUNS)
    # Rows were recorded in the order the members finished, each as it finished.
    assert [r["name"] for r in rows] == sorted((r.name for r in RUNS), key=lambda n: outcomes[n].steps)
    assert rows[0]["device"] == "cpu" and rows[0]["logprob_backend"] == "fused"
    assert {r["trained_as"] for r in rows} == {f"ensemble of {len(RUNS)}"}
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    if repack_fraction == 1.0:  # nothing repacked: the finished members sat in their slots, untouched
        assert trainer.model.members == len(RUNS)
        for k, run in enumerate(RUNS):
            final = trainer.model.export_member(k)
            assert all(torch.equal(final[n], w) for n, w in workload.models[run.name].items()), run.name
    else:
        assert trainer.model.members == 2  # repacked down to the two members that end last, at step 60


# ---------------------------------------------------------------------------------------
# The dry run, as a user runs it


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    out = tmp_path / "runs"
    result = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--dry-run", "--ensemble", "auto")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "4 runs to train on cpu" in text and text.count("group ") == 2 and "ms/step alone" in text
    assert "estimated wall-clock at the step caps" in text
    assert not out.exists()  # nothing written: no folder, no lock, no rows
    two = memk("run-capacity", "--preset", "smoke", "--dry-run", "--workers", "2", "--ensemble", "off")
    assert two.returncode == 0, two.stderr
    assert "--ensemble off, 2 workers, one thread each" in two.stdout and "one at a time" in two.stdout


# ---------------------------------------------------------------------------------------
# CUDA: the ensemble step eager, compiled, or compiled and replayed as CUDA graphs (unverified where written: no GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_on_cuda_the_compiled_ensemble_loss_and_gradients_are_the_eager_ones(mode):
    cuda = torch.device("cuda")
    config = GPTConfig(1, 32, 2, 64, 16)
    ensemble = EnsembleGPT(config, 3, "sdpa", "reference", device=cuda)
    with torch.no_grad():
        for p in ensemble.params.values():
            p.normal_(0, 0.1)
    x, rows = torch.randint(0, 64, (3, 8, 16), device=cuda), torch.tensor([8, 5, 8], device=cuda)
    losses_of = compiled_losses(ensemble, mode)
    results = []
    for member_losses in (ensemble.member_losses, losses_of, losses_of):  # compiled: a second call replays
        losses = member_losses(x, rows)
        grads = torch.autograd.grad(losses.sum(), list(ensemble.params.values()))
        results.append((losses.detach().clone(), [g.clone() for g in grads]))
    for losses, grads in results[1:]:
        torch.testing.assert_close(losses, results[0][0], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["eager", "cuda-graphs"])  # compiling costs ~15 s
def test_on_cuda_ensemble_members_end_as_the_runs_trained_alone(tmp_path, mode):
    cuda = torch.device("cuda")
    runs = [replace(r, backends=Backends("sdpa", "reference")) for r in RUNS]
    by_executor = {}
    workload = KeepingWorkload()
    with RunStore(tmp_path / "local", "capacity") as store:
        LocalExecutor(cuda).execute(runs, workload, store, quiet(len(runs)))
    by_executor["local"] = workload.outcomes
    workload = KeepingWorkload()
    with RunStore(tmp_path / "ensemble", "capacity") as store:  # one compile: no repack changes K
        plan = EnsemblePlan(runs, slots=len(runs), compile_mode=mode)
        EnsembleTrainer(plan, workload, store, quiet(len(runs)), cuda, repack_fraction=1.0).train()
    by_executor["ensemble"] = workload.outcomes
    for run in runs:  # float32 on a GPU: the same stops, bits to float32 rounding grown over 60 steps
        a, b = by_executor["local"][run.name], by_executor["ensemble"][run.name]
        assert (a.steps, a.stop_reason) == (b.steps, b.stop_reason)
        assert b.memorized_bits == pytest.approx(a.memorized_bits, rel=1e-3)
