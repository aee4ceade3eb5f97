"""The ensemble executor against the single-model trainer it must reproduce.

Float64 on CPU makes the comparison tight: each member of an ensemble must end where
train_to_saturation ends the same run alone (same weights, bits curve, stop step and
reason), whatever its dataset size, seed, schedule and stop, and however the ensemble
repacks, refills its slots, splits under a memory cap or is killed and resumed.
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from memk.memorize.data import uniform_random_sequences
from memk.memorize.ensemble import COMPILE_MODES, EnsembleAdamW, EnsembleGPT, compiled_losses, parameter_shapes
from memk.memorize.runs.ensemble_executor import (
    EnsembleExecutor,
    EnsemblePlan,
    EnsembleTrainer,
    member_bytes,
    parse_ensemble,
    plan_ensembles,
)
from memk.memorize.errors import ConfigError
from memk.memorize.model import GPT, GPTConfig
from memk.memorize.runtime import Backends
from memk.memorize.schedule import TrainConfig
from memk.memorize.runs.store import RunStore
from memk.memorize.runs.sweep import LocalExecutor, Run, SweepProgress
from memk.memorize.train import train_to_saturation, uniform_code_signal

CPU = torch.device("cpu")
MODEL = GPTConfig(1, 16, 2, 16, 8)
BACKENDS = Backends("sdpa", "fused")
TRAIN = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=60, cooldown_steps=10, min_steps=20,
                    eval_every=10, plateau_window=2, plateau_rel_tol=0.02)
# Members that differ in everything a member owns: dataset size (10 < batch: padded rows),
# seed, step cap and cool-down, learning rate, weight decay, gradient clip; one plateaus early.
RUNS = [
    Run("big", MODEL, 40, TRAIN, BACKENDS),
    Run("small", MODEL, 10, replace(TRAIN, seed=1, max_steps=30, cooldown_steps=5), BACKENDS),
    Run("decayed", MODEL, 24, replace(TRAIN, seed=2, lr=3e-2, weight_decay=0.1, grad_clip=0.5), BACKENDS),
    Run("tiny", MODEL, 3, replace(TRAIN, seed=3, lr=3e-2, min_steps=10), BACKENDS),
]
# Float64 results of the same code on the same machine differ only by the order of
# summations (bmm against mm, one norm over K members against K norms): 1e-16 relative
# per operation, grown by a few dozen optimizer steps.
PARAM_ATOL = 1e-9
BITS_RTOL = 1e-10


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # GPT and its init then build in float64, in both trainers
    yield
    torch.set_default_dtype(before)


class KeepingWorkload:
    """Uniform data; keeps each finished run's exported weights and outcome."""

    def __init__(self):
        self.models, self.outcomes = {}, {}

    def training_data(self, run):
        return uniform_random_sequences(run.n_sequences, run.model.vocab_size, run.model.seq_len, seed=run.train.seed)

    def stop_signal(self, run, data):
        return uniform_code_signal(data, run.train.precision)

    def result(self, run, model, outcome, data):
        self.models[run.name] = {k: v.clone() for k, v in model.state_dict().items()}
        self.outcomes[run.name] = outcome
        return {"run_id": run.run_id, "name": run.name, "memorized_bits": outcome.memorized_bits, "steps": outcome.steps}


def alone(run):
    """The run trained by train_to_saturation, as LocalExecutor trains it."""
    data = KeepingWorkload().training_data(run)
    model, outcome = train_to_saturation(run.model, data, run.train, CPU, attention_backend=run.backends.attention,
                                         logprob_backend=run.backends.logprob)
    return model.state_dict(), outcome


_alone_cache = {}


def alone_cached(run):
    # Float64 single-run results, shared by the tests of this file (they depend on the run only).
    if run.run_id not in _alone_cache:
        _alone_cache[run.run_id] = alone(run)
    return _alone_cache[run.run_id]


def assert_same_as_alone(workload, runs):
    for run in runs:
        weights, outcome = alone_cached(run)
        got = workload.outcomes[run.name]
        assert (got.steps, got.stop_reason) == (outcome.steps, outcome.stop_reason), run.name
        assert [s for s, _ in got.curve] == [s for s, _ in outcome.curve], run.name
        np.testing.assert_allclose([b for _, b in got.curve], [b for _, b in outcome.curve], rtol=BITS_RTOL, err_msg=run.name)
        assert got.final_loss == pytest.approx(outcome.final_loss, rel=BITS_RTOL)
        for name, w in weights.items():
            torch.testing.assert_close(workload.models[run.name][name], w, rtol=0, atol=PARAM_ATOL, msg=f"{run.name} {name}")


def quiet(total=0):
    return SweepProgress(total, 0, "test", enabled=False)


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


@pytest.mark.slow
def test_a_memory_cap_splits_a_group_into_fewer_slots_that_refill(tmp_path, float64):
    runs = RUNS + [Run("fifth", MODEL, 17, replace(TRAIN, seed=5, max_steps=40, cooldown_steps=10), BACKENDS)]
    budget = int(2.5 * member_bytes(runs[0]))  # room for two members
    executor = EnsembleExecutor(CPU, memory_budget=budget)
    plans = executor.plans(runs)  # "tiny" (3 rows a batch against 16) trains apart from the others
    assert [([r.name for r in p.runs], p.slots, p.memory_capped) for p in plans] == [
        (["big", "small", "decayed", "fifth"], 2, True), (["tiny"], 1, False)]
    workload = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        executor.execute(runs, workload, store, quiet(len(runs)))
        assert len(store.rows_of(runs)) == len(runs)
    assert executor.trained == [{"runs": 4, "slots": 2, "most_members": 2}]
    assert_same_as_alone(workload, runs)


@pytest.mark.parametrize("member_step, stacked", [(0.85, True), (0.95, False), (1.2, False)])
def test_auto_stacks_a_group_only_where_its_member_step_is_clearly_faster(monkeypatch, member_step, stacked):
    import memk.memorize.runs.ensemble_executor as ee

    runs = RUNS[:3]
    monkeypatch.setattr(ee, "probe_step_seconds", lambda run, k, device, limits: (1.0, k * member_step))
    plans = EnsembleExecutor(CPU, choose_faster=True).plans(runs)
    assert [p.slots for p in plans] == [3 if stacked else 1]
    assert plans[0].probe == (3, 1.0, 3 * member_step)  # what --dry-run prints


def test_jobs_side_by_side_share_the_memory_budget():
    runs = RUNS[:3]  # one ensemble key, one batch-rows bucket
    executor = EnsembleExecutor(CPU, memory_budget=int(4.5 * member_bytes(runs[0])))
    assert [(p.slots, p.memory_capped) for p in executor.plans(runs)] == [(3, False)]
    assert [(p.slots, p.memory_capped) for p in executor.plans(runs, workers=2)] == [(2, True)]  # 2.25 members each


class Killed(Exception):
    pass


class KillingProgress(SweepProgress):
    """Raises Killed when a given run reaches a given step, as a kill -9 would stop the process there."""

    def __init__(self, run_name, step):
        super().__init__(0, 0, "test", enabled=False)
        self.run_name, self.step = run_name, step

    def run_started(self, run):
        _, close = super().run_started(run)

        def on_step(p):
            if run.name == self.run_name and p["step"] == self.step:
                raise Killed

        return on_step, close


@pytest.mark.slow
@pytest.mark.parametrize("resume_with", ["ensemble", "local"])
def test_an_ensemble_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, float64, resume_with):
    workload = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        with pytest.raises(Killed):  # at step 55 of "big", "small" (30 steps) is recorded; "tiny" trains later, apart
            EnsembleExecutor(CPU, max_members=4).execute(RUNS, workload, store, KillingProgress("big", 55))
        finished_before = list(store.rows)
    assert [r["name"] for r in finished_before] == ["small"]
    saved = {p.stem: torch.load(p, weights_only=False)["step"] for p in (tmp_path / "checkpoints").glob("*.pt")}
    assert sorted(saved.values()) == [50, 50]  # big and decayed, each at its last evaluation

    executor = EnsembleExecutor(CPU, max_members=4) if resume_with == "ensemble" else LocalExecutor(CPU)
    with RunStore(tmp_path, "capacity") as store:
        todo = store.todo(RUNS)
        assert sorted(r.name for r in todo) == ["big", "decayed", "tiny"]
        executor.execute(todo, workload, store, quiet(len(RUNS)))
        rows = store.rows  # in the order they were recorded
    assert rows[:1] == finished_before  # finished members kept as they were, not retrained
    assert len(rows) == len(RUNS) and not list((tmp_path / "checkpoints").glob("*.pt"))
    assert_same_as_alone(workload, RUNS)


def test_a_killed_ensemble_resumes_in_its_packing_to_the_last_digit_in_float32(tmp_path, monkeypatch):
    # Float32 rounds differently alone and in an ensemble; --ensemble auto's probe, taken again by the
    # rerun, can decide the other way (a group at 0.9x is on the edge). The rerun must train each
    # unfinished run as the first run packed it: then it ends where the uninterrupted sweep ends, bit for bit.
    import memk.memorize.runs.ensemble_executor as ee

    def probe_says(stack):
        monkeypatch.setattr(ee, "probe_step_seconds",
                            lambda run, k, device, limits: (1.0, k * (0.5 if stack else 1.5)))

    probe_says(stack=True)
    uninterrupted = KeepingWorkload()
    with RunStore(tmp_path / "whole", "capacity") as store:
        EnsembleExecutor(CPU, choose_faster=True).execute(RUNS, uninterrupted, store, quiet(len(RUNS)))
        whole = {r["run_id"]: r for r in store.rows}
    assert {r["trained_as"] for r in whole.values()} == {"ensemble of 3", "alone"}  # tiny trains apart (3 rows)

    resumed = KeepingWorkload()
    with RunStore(tmp_path / "killed", "capacity") as store:
        with pytest.raises(Killed):
            EnsembleExecutor(CPU, choose_faster=True).execute(RUNS, resumed, store, KillingProgress("big", 55))
    probe_says(stack=False)  # the rerun's probe would now train the group one run at a time
    with RunStore(tmp_path / "killed", "capacity") as store:
        todo = store.todo(RUNS)
        assert sorted(r.name for r in todo) == ["big", "decayed", "tiny"]
        EnsembleExecutor(CPU, choose_faster=True).execute(todo, resumed, store, quiet(len(RUNS)))
        rows = {r["run_id"]: r for r in store.rows}
    assert rows.keys() == whole.keys()
    for run_id, row in rows.items():
        assert row["memorized_bits"] == whole[run_id]["memorized_bits"], row["name"]
        assert row["trained_as"] == whole[run_id]["trained_as"], row["name"]
    for name, weights in uninterrupted.models.items():
        assert all(torch.equal(resumed.models[name][k], w) for k, w in weights.items()), name


def test_a_run_resumes_on_the_threads_it_started_with(tmp_path, monkeypatch):
    # Side by side, runs train on one thread each; a rerun with one run left would give it every core
    # (here: the policy made to say 2). Float32 rounding depends on the thread count: it keeps 1.
    import memk.memorize.runtime as runtime

    runs = RUNS[:2]
    killed = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        with pytest.raises(Killed):
            LocalExecutor(CPU, workers=2).execute(runs, killed, store, KillingProgress("big", 55))
    monkeypatch.setattr(runtime, "ONE_THREAD_BELOW_FLOPS", 0.0)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    monkeypatch.delenv("MEMK_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with RunStore(tmp_path, "capacity") as store:
        todo = store.todo(runs)  # "big", and "small" where the kill stopped it first
        assert "big" in [r.name for r in todo]
        LocalExecutor(CPU, workers="auto").execute(todo, killed, store, quiet(len(runs)))
        row = store.row_of(runs[0])
    assert row["torch_threads"] == 1
    whole = KeepingWorkload()
    with RunStore(tmp_path / "whole", "capacity") as store:
        with runtime.cpu_threads_pinned(1):
            LocalExecutor(CPU).execute(runs[:1], whole, store, quiet(1))
    assert all(torch.equal(killed.models["big"][k], w) for k, w in whole.models["big"].items())


def test_the_packing_a_rerun_resumes_is_what_the_first_run_planned():
    from memk.memorize.runs.ensemble_executor import packing_entries, recorded_plans

    plan = EnsemblePlan(RUNS[:3], slots=3)
    recorded = packing_entries(plan, {RUNS[0].run_id: 2})
    recorded.update(packing_entries(EnsemblePlan(RUNS[3:], 1), {RUNS[3].run_id: 1}))
    recorded["junk"] = {"slots": "many"}
    fresh = Run("fresh", MODEL, 12, replace(TRAIN, seed=7), BACKENDS)
    # "big" finished: the rest of its ensemble resumes in the same slots, job and threads.
    plans, rest = recorded_plans([RUNS[1], fresh, RUNS[2], RUNS[3]], recorded)
    assert rest == [fresh]
    assert [([r.name for r in p.runs], p.slots, p.threads, p.job) for p in plans] == [
        (["small", "decayed"], 3, 2, RUNS[0].run_id), (["tiny"], 1, 1, RUNS[3].run_id)]


@pytest.mark.slow
def test_ensembles_side_by_side_end_as_the_runs_trained_alone(tmp_path, float64):
    # Two workers: the ensemble of big, small and decayed on one thread, tiny (apart: 3 rows
    # a batch) on the other, each member's weights seeded while the other trains.
    workload = KeepingWorkload()
    executor = EnsembleExecutor(CPU, max_members=4, workers=2)
    with RunStore(tmp_path, "capacity") as store:
        executor.execute(RUNS, workload, store, quiet(len(RUNS)))
        assert [r["name"] for r in store.rows_of(RUNS)] == [r.name for r in RUNS]
    assert executor.trained == [{"runs": 3, "slots": 3, "most_members": 3}]
    assert_same_as_alone(workload, RUNS)


@pytest.mark.slow
def test_side_by_side_a_killed_ensemble_stops_the_other_worker_and_resumes(tmp_path, float64):
    workload = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        with pytest.raises(Killed):
            EnsembleExecutor(CPU, max_members=4, workers=2).execute(RUNS, workload, store, KillingProgress("big", 55))
        finished_before = list(store.rows)
    assert "small" in [r["name"] for r in finished_before]  # what finished before the kill is kept
    with RunStore(tmp_path, "capacity") as store:
        todo = store.todo(RUNS)
        assert "big" in [r.name for r in todo] and len(todo) == len(RUNS) - len(finished_before)
        EnsembleExecutor(CPU, max_members=4, workers=2).execute(todo, workload, store, quiet(len(RUNS)))
        rows = store.rows
    assert rows[:len(finished_before)] == finished_before and len(rows) == len(RUNS)
    assert_same_as_alone(workload, RUNS)


# ---------------------------------------------------------------------------------------
# Planning and the --ensemble option


def test_runs_group_by_shape_precision_batch_backends_and_batch_rows_and_k_caps_the_slots():
    base = Run("a", MODEL, 10, TRAIN, BACKENDS)
    others = [
        replace(base, name="b", n_sequences=20, train=replace(TRAIN, seed=4, lr=0.1)),  # same group: per-member things
        replace(base, name="c", model=GPTConfig(1, 8, 1, 16, 8)),
        replace(base, name="d", train=replace(TRAIN, precision="bfloat16-autocast")),
        replace(base, name="e", train=replace(TRAIN, batch_size=32)),
        replace(base, name="f", backends=Backends("reference", "fused")),
        replace(base, name="g", n_sequences=30),
        replace(base, name="h", n_sequences=7),  # 7 rows a batch: less than half of a's 10, b's and g's 16
        replace(base, name="i", n_sequences=4),
        # bfloat16 weights: EnsembleGPT stacks float32 weights only, so each trains alone, planned first
        replace(base, name="j", train=replace(TRAIN, precision="bfloat16")),
        replace(base, name="k", n_sequences=20, train=replace(TRAIN, precision="bfloat16")),
    ]
    plans = plan_ensembles([base, *others], max_members=2, memory_budget=None)
    assert [[r.name for r in p.runs] for p in plans] == [["j"], ["k"], ["a", "b", "g"], ["h", "i"], ["c"], ["d"], ["e"], ["f"]]
    assert [p.slots for p in plans] == [1, 1, 2, 2, 1, 1, 1, 1]
    assert plan_ensembles([base, *others], max_members=None, memory_budget=None)[2].slots == 3


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("OFF", "off"), ("8", 8), (" 1 ", 1)])
def test_the_ensemble_option_reads_auto_off_or_a_count(text, expected):
    assert parse_ensemble(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "lots", "", "+4"])
def test_a_bad_ensemble_option_names_the_problem_and_the_fix(text):
    with pytest.raises(ConfigError, match="--ensemble must be auto, off or a whole number"):
        parse_ensemble(text)


# ---------------------------------------------------------------------------------------
# The command line, as a user runs it

MEMK = [sys.executable, "-m", "memk.cli"]
OUTSIDE = tempfile.gettempdir()  # `python -m` puts the working directory on sys.path


def memk(*args):
    return subprocess.run([*MEMK, *args], capture_output=True, text=True, timeout=600, cwd=OUTSIDE)


@pytest.mark.parametrize("command, value", [("run-capacity", "0"), ("run-generalization", "many")])
def test_a_bad_ensemble_value_is_one_line_and_exit_2(tmp_path, command, value):
    result = memk(command, "--preset", "smoke", "--out", str(tmp_path), "--ensemble", value)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "--ensemble must be auto, off or a whole number of members" in lines[0]
    assert not (tmp_path / "runs.jsonl").exists()


@pytest.mark.parametrize("command", ["run-capacity", "run-generalization"])
@pytest.mark.parametrize("value, env, message", [
    ("0", {}, "--workers must be auto or a whole number >= 1"),
    ("2", {"MEMK_NUM_THREADS": "2"}, "asks for 2; unset it, or use --workers 1"),
])
def test_a_bad_workers_value_is_one_line_and_exit_2_before_anything_is_written(tmp_path, command, value, env,
                                                                               message):
    out = tmp_path / "out"
    result = subprocess.run([*MEMK, command, "--preset", "smoke", "--out", str(out), "--workers", value],
                            capture_output=True, text=True, timeout=600, cwd=OUTSIDE, env={**os.environ, **env})
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


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


@pytest.mark.slow
def test_the_smoke_preset_through_the_ensemble_matches_the_local_executor(tmp_path):
    summaries = {}
    for mode in ("off", "4"):
        out = tmp_path / mode
        result = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--no-progress", "--ensemble", mode)
        assert result.returncode == 0, result.stderr
        summaries[mode] = json.loads((out / "summary.json").read_text())["precisions"]["float32"]
    # Float32: the ensemble's batched products sum in another order than nn.Linear's, so the
    # two executors agree to float32 rounding grown over 30 steps, not bit for bit.
    local, ensemble = summaries["off"], summaries["4"]
    for a, b in zip(local["models"], ensemble["models"]):
        assert a["model_name"] == b["model_name"] and a["capacity_at_n_sequences"] == b["capacity_at_n_sequences"]
        assert b["capacity_bits"] == pytest.approx(a["capacity_bits"], rel=1e-3)
        for p, q in zip(a["points"], b["points"]):
            assert (p["steps"], p["stop_reason"]) == (q["steps"], q["stop_reason"])
            assert q["memorized_bits"] == pytest.approx(p["memorized_bits"], rel=1e-3)
    assert ensemble["fit"]["through_origin"]["alpha"] == pytest.approx(local["fit"]["through_origin"]["alpha"], rel=1e-3)


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
